"""STARFlow2 generation: one `lax.while_loop` over the joint cached step (STARFLOW2.md 7.1-7.4, 7.7,
7.8). B conversations; with guidance R = 2B rows [cond; uncond] (the null prompt in the same batch),
otherwise R = B. M = max_new_tokens positions, I = max_images generated image slots, N latents of D
channels per image, V the vocabulary.

Prompts are left-padded (every row's last prompt column is real; pads are masked keys with position 0)
and prefilled with `joint_step`, then every iteration feeds one position per row (all rows write the
same cache column), choosing per row with `where`:
  text mode    the token sampled from the cond half's logits (greedy / temperature / top-p; ids at or
               past the vocabulary, <|image_pad|> and <|vision_end|> never sampled; <|vision_start|>
               only while an image slot is free), appended identically to both halves; a stop id
               ends the row;
  image mode   latent n: u_n = mu + tau sigma eps_n from the deep Gaussians (guided: the [cond; uncond]
               parameters combined by `flows.guidance`; both halves receive the same u_n), at M-RoPE
               position (s, s + r, s + c) of its grid cell; a row enters it after feeding (or being
               prompted with) <|vision_start|>;
  end          after N latents the forced <|vision_end|> (never sampled), then text mode again.
Finished rows feed masked pads. Generated latents u enter both caches directly; images are decoded
outside the loop (`generate.images`).

Jacobi (`GenerateConfig.jacobi`, flows.Jacobi): the loop takes a whole chunk of k = block_size latents
by the flow core's fixed-point rule (STARFLOW2.md 7.3: rewind both caches, re-run the chunk, delta a
mean over the chunk and the whole batch, so the decision is global and every device of a mesh iterates
equally; exact caches re-written after convergence, or the reference's stale caches) at an iteration
where, all together,
  every row is unfinished and in image mode (no row in text, at its forced <|vision_end|> or done),
  every row is at the same cell n of its image, n a multiple of k, and
  the chunk fits: i + k <= M.
At any other iteration every row steps one position sequentially, so rows out of step (interleaved
batches whose rows request their images at different columns, or with a row already done) decode
their image spans sequentially, with exactly the sequential result; the counts reported are those of
the chunks taken (-1: unused). Text-to-image batches (every row starts in its image at cell 0) always
chunk.

Noise is per row, independent of the batch: eps of latent n of image k of row b is
normal(fold_in(fold_in(fold_in(key_image, b), k), n)); text draws use fold_in(fold_in(key_text, b), i).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from starflow2_jax.errors import UserError
from starflow2_jax.flows.block import Affine, affine_from_raw
from starflow2_jax.flows.guidance import Guidance
from starflow2_jax.flows.sampling import Jacobi
from starflow2_jax.generate.step import Caches, joint_step
from starflow2_jax.pretzel.model import Pretzel
from starflow2_jax.pretzel.tokens import SpecialTokens
from starflow2_jax.vlm.generate import SamplingConfig, sample_token
from starflow2_jax.vlm.model import Qwen2_5_VL

TEXT, IMAGE, END = 0, 1, 2  # per-row modes
_TEXT_STREAM, _IMAGE_STREAM = 0, 1  # sub-keys of the generation key


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
  """Static generation settings (hashable).

  max_new_tokens: positions generated after the prompt (text tokens, latents and <|vision_end|>);
  max_images: generated image slots per row; stop_after_images: a row ends after this many images
  (text-to-image: 1; 0: never); text_temperature (0 = greedy), top_p: text sampling; temperature: the
  image noise temperature tau; guidance: flows.Guidance (weight 0: none); jacobi: flows.Jacobi or None;
  image_positions: "mrope" | "1d" (the sequences' vlm.image_positions)."""
  specials: SpecialTokens
  max_new_tokens: int = 512
  max_images: int = 1
  stop_after_images: int = 0
  text_temperature: float = 0.0
  top_p: float = 1.0
  temperature: float = 1.0
  guidance: Guidance = Guidance()
  jacobi: Jacobi | None = None
  image_positions: str = "mrope"

  def sampling(self, vocab_limit: int) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.text_temperature,
                          top_p=self.top_p, eos_ids=self.specials.stop_ids, pad_id=self.specials.pad,
                          vocab_limit=vocab_limit)


def latent_noise(key: jax.Array, rows: jax.Array, image: jax.Array, cells: jax.Array, dim: int):
  """Standard normal eps [B, k, D] of latents `cells` [B, k] of image `image` [B] of rows `rows` [B]."""
  def one(r, i, cs):
    k = jax.random.fold_in(jax.random.fold_in(key, r), i)
    return jax.vmap(lambda c: jax.random.normal(jax.random.fold_in(k, c), (dim,)))(cs)
  return jax.vmap(one)(rows, image, cells)


def image_positions(start: jax.Array, cells: jax.Array, grid: tuple[int, int], mode: str):
  """M-RoPE ids [R, k, 3] of latent cells [R, k] of images starting at position s = start [R]."""
  s = start[:, None]
  if mode == "1d":
    return jnp.broadcast_to((s + cells)[..., None], (*cells.shape, 3)).astype(jnp.int32)
  r, c = jnp.divmod(cells, grid[1])
  return jnp.stack([jnp.broadcast_to(s, cells.shape), s + r, s + c], -1).astype(jnp.int32)


def _after_image(start: jax.Array, grid: tuple[int, int], mode: str) -> jax.Array:
  """The position of <|vision_end|> after an image starting at s."""
  return start + (grid[0] * grid[1] if mode == "1d" else max(grid))


class _Run:
  """The pieces of one generation, closed over the static model and config."""

  def __init__(self, model: Pretzel, vlm: Qwen2_5_VL, gcfg: GenerateConfig, params, vlm_params,
               batch: int, rows: int):
    self.model, self.vlm, self.g, self.params, self.vlm_params = model, vlm, gcfg, params, vlm_params
    self.cfg = model.cfg
    self.b, self.r = batch, rows
    self.guided = rows == 2 * batch

  def dup(self, x):
    """[B, ...] -> [R, ...] (both halves get the same value)."""
    return jnp.concatenate([x, x]) if self.guided else x

  def step(self, caches, tokens, u, is_image, positions, valid, running):
    return joint_step(self.model, self.params, self.vlm, self.vlm_params, caches, tokens, u, is_image,
                      positions, valid, running)

  def gaussians(self, raw: jax.Array, cells: jax.Array, weight) -> Affine:
    """raw [R, k, 2D] (the parameters of latents `cells` [B, k]) -> the (guided) Affine [B, k, D];
    weight: the guidance weight w (annealed: w (n + 1) / N for latent n)."""
    theta = affine_from_raw(raw, "starflow", self.cfg.soft_clip)
    if not self.guided:
      return theta
    g, b, n = self.g.guidance, self.b, self.cfg.num_latents
    cond, uncond = Affine(*(a[:b] for a in theta)), Affine(*(a[b:] for a in theta))
    w = jnp.broadcast_to(jnp.asarray(weight, raw.dtype), cells.shape)
    if g.anneal:
      w = w * (cells + 1).astype(raw.dtype) / n
    return g.combine(cond, uncond, w[..., None])


def generate(model: Pretzel, vlm: Qwen2_5_VL, gcfg: GenerateConfig, params, vlm_params, prompt: dict,
             rng: jax.Array, return_trace: bool = False, weight=None) -> dict:
  """Generate after left-padded prompts (jit it: `jitted_generate`).

  prompt (arrays, R rows; `generate.prompts.batch`): tokens [R, L], valid [R, L], positions [R, L, 3],
  is_image [R, L], u [R, L, D] (input images' latents at their positions), next_position [R],
  cond_rows: B (a Python int: R = B unguided, 2B guided), optionally forced [B, M] int32: the token a
  text-mode row is given at output column i instead of sampling (-1: sample; e.g. <|vision_start|> to
  request an image). weight: a traced guidance weight (None: gcfg.guidance.weight), so one compiled
  generator serves every w.
  Returns {tokens [B, M] (pad after a row ends), valid [B, M], positions [R, M, 3], is_image [B, M],
  image_slot / image_cell [B, M] (-1 at text), latents u [B, I, N, D], num_images [B], lengths [B],
  jacobi_iters [C] (iterations per Jacobi chunk, -1 unused; C = I N / block_size)} and, with
  return_trace, logits [R, M, V] and raw [R, M, 2D]: the outputs each position's input was drawn from."""
  cfg, g = model.cfg, gcfg
  sp = g.specials
  rows, length = prompt["tokens"].shape
  b = int(prompt["cond_rows"])
  m, n_img, n_lat, dim = g.max_new_tokens, g.max_images, cfg.num_latents, cfg.token_dim
  grid = cfg.token_grid
  run = _Run(model, vlm, g, params, vlm_params, b, rows)
  if g.guidance.active and not run.guided:
    raise ValueError(f"guidance weight {g.guidance.weight} needs [cond; uncond] prompts: {2 * b} rows "
                     f"for {b} conversations, found {rows}")
  if g.jacobi is not None and n_lat % g.jacobi.block_size:
    raise UserError(f"jacobi.block_size={g.jacobi.block_size} must divide the N={n_lat} latents of an "
                    "image")
  sampling = g.sampling(cfg.text_vocab)
  key_text, key_img = (jax.random.fold_in(rng, s) for s in (_TEXT_STREAM, _IMAGE_STREAM))
  row_ids = jnp.arange(b, dtype=jnp.int32)
  fdt = cfg.flow_dtype
  forced = prompt.get("forced")
  weight = g.guidance.weight if weight is None else weight

  valid0 = prompt["valid"]
  running0 = jnp.maximum(jnp.cumsum(valid0, axis=1) - 1, 0).astype(jnp.int32)
  caches = Caches.init(cfg, rows, length + m)
  caches, logits, raw = run.step(caches, prompt["tokens"], prompt["u"], prompt["is_image"],
                                 prompt["positions"], valid0, running0)
  last_in = prompt["tokens"][:b, -1]
  mode0 = jnp.where(last_in == sp.vision_start, IMAGE, TEXT).astype(jnp.int32)
  num_chunks = n_img * n_lat // g.jacobi.block_size if g.jacobi is not None else 1
  state = dict(
      i=jnp.zeros((), jnp.int32), caches=caches, logits=logits[:, -1], raw=raw[:, -1],
      mode=mode0, cell=jnp.zeros((b,), jnp.int32), start=prompt["next_position"].astype(jnp.int32),
      next_pos=prompt["next_position"].astype(jnp.int32),
      count=jnp.sum(valid0, axis=1).astype(jnp.int32), images=jnp.zeros((b,), jnp.int32),
      done=jnp.zeros((b,), bool), lengths=jnp.zeros((b,), jnp.int32),
      tokens=jnp.full((b, m), sp.pad, jnp.int32), valid=jnp.zeros((b, m), bool),
      positions=jnp.zeros((rows, m, 3), jnp.int32), is_image=jnp.zeros((b, m), bool),
      image_slot=jnp.full((b, m), -1, jnp.int32), image_cell=jnp.full((b, m), -1, jnp.int32),
      latents=jnp.zeros((b, n_img, n_lat, dim), fdt),
      jacobi_iters=jnp.full((num_chunks,), -1, jnp.int32), chunk=jnp.zeros((), jnp.int32))
  if return_trace:
    state["trace_logits"] = jnp.zeros((rows, m, logits.shape[-1]), jnp.float32)
    state["trace_raw"] = jnp.zeros((rows, m, raw.shape[-1]), fdt)

  def text_token(s):
    """The token each row would sample now [B] (cond half)."""
    lg = s["logits"][:b]
    vocab = jnp.arange(lg.shape[-1])
    banned = (vocab == sp.image_pad) | (vocab == sp.vision_end)
    banned = banned[None] | ((vocab == sp.vision_start)[None] & (s["images"] >= n_img)[:, None])
    lg = jnp.where(banned, -jnp.inf, lg)
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key_text, r), s["i"]))(row_ids)
    tok = jax.vmap(lambda l, k: sample_token(l[None], k, sampling)[0])(lg, keys)
    if forced is None:
      return tok
    f = jax.lax.dynamic_index_in_dim(forced, s["i"], axis=1, keepdims=False)
    return jnp.where(f >= 0, f, tok)

  def record(s, at, k, tokens, valid, positions, is_img, slot, cell):
    """Write k positions [B, k] ([R, k, 3] positions) at output column `at`."""
    put = lambda a, v: jax.lax.dynamic_update_slice_in_dim(a, v.astype(a.dtype), at, axis=1)  # noqa
    return dict(s, tokens=put(s["tokens"], tokens), valid=put(s["valid"], valid),
                positions=put(s["positions"], positions), is_image=put(s["is_image"], is_img),
                image_slot=put(s["image_slot"], slot), image_cell=put(s["image_cell"], cell))

  def trace(s, at, logits_k, raw_k):
    if not return_trace:
      return s
    put = lambda a, v: jax.lax.dynamic_update_slice_in_dim(a, v.astype(a.dtype), at, axis=1)  # noqa
    return dict(s, trace_logits=put(s["trace_logits"], logits_k), trace_raw=put(s["trace_raw"], raw_k))

  def sequential(s):
    mode, cell, done = s["mode"], s["cell"], s["done"]
    tok_text = text_token(s)
    theta = run.gaussians(s["raw"][:, None], cell[:, None], weight)
    eps = latent_noise(key_img, row_ids, s["images"], cell[:, None], dim)[:, 0]
    u_new = theta.shift[:, 0] + g.temperature * theta.scale[:, 0] * eps
    in_text, in_img, in_end = (mode == TEXT) & ~done, (mode == IMAGE) & ~done, (mode == END) & ~done
    tok = jnp.where(in_text, tok_text, jnp.where(in_img, sp.image_pad,
                                                 jnp.where(in_end, sp.vision_end, sp.pad)))
    start_r, next_r = s["start"], s["next_pos"]
    img_pos = image_positions(start_r, run.dup(cell)[:, None], grid, g.image_positions)[:, 0]
    end_pos = _after_image(start_r, grid, g.image_positions)
    pos = jnp.where(run.dup(in_img)[:, None], img_pos,
                    jnp.where(run.dup(in_end), end_pos, next_r)[:, None])
    pos = jnp.where(run.dup(done)[:, None], 0, pos).astype(jnp.int32)
    valid = ~done
    caches, logits, raw = run.step(s["caches"], run.dup(tok)[:, None], run.dup(u_new)[:, None, :],
                                   run.dup(in_img)[:, None], pos[:, None], run.dup(valid)[:, None],
                                   s["count"][:, None])
    s = trace(s, s["i"], s["logits"][:, None], s["raw"][:, None])
    s = record(s, s["i"], 1, tok[:, None], valid[:, None], pos[:, None], in_img[:, None],
               jnp.where(in_img, s["images"], -1)[:, None], jnp.where(in_img, cell, -1)[:, None])
    latents = s["latents"]
    if n_img:
      bidx = jnp.where(in_img, row_ids, b)  # rows not in image mode write a dropped index
      latents = latents.at[bidx, jnp.minimum(s["images"], n_img - 1), cell].set(u_new, mode="drop")
    stop = in_text & jnp.isin(tok, jnp.asarray(sp.stop_ids, jnp.int32))
    to_image = in_text & (tok == sp.vision_start)
    cell_next = jnp.where(in_img, cell + 1, jnp.where(to_image, 0, cell))
    images = s["images"] + in_end.astype(jnp.int32)
    mode_next = jnp.where(to_image, IMAGE, jnp.where(in_img & (cell_next == n_lat), END,
                                                     jnp.where(in_end, TEXT, mode)))
    next_pos = jnp.where(run.dup(in_text), next_r + 1,
                         jnp.where(run.dup(in_end), end_pos + 1, next_r))
    start = jnp.where(run.dup(to_image), next_r + 1, start_r)
    finished = stop | (in_end & (g.stop_after_images > 0) & (images >= g.stop_after_images))
    return dict(s, i=s["i"] + 1, caches=caches, logits=logits[:, 0], raw=raw[:, 0], mode=mode_next,
                cell=cell_next, start=start, next_pos=next_pos,
                count=s["count"] + run.dup(valid).astype(jnp.int32), images=images,
                done=done | finished, lengths=s["lengths"] + valid.astype(jnp.int32), latents=latents)

  def jacobi_chunk(s):
    jac = g.jacobi
    k = jac.block_size
    cell0 = s["cell"][0]
    cells = cell0 + jnp.arange(k, dtype=jnp.int32)
    cells_b = jnp.broadcast_to(cells, (b, k))
    eps = g.temperature * latent_noise(key_img, row_ids, s["images"], cells_b, dim)
    pos = image_positions(s["start"], jnp.broadcast_to(cells, (rows, k)), grid, g.image_positions)
    running = s["count"][:, None] + jnp.arange(k, dtype=jnp.int32)
    ones = jnp.ones((rows, k), bool)
    pads = jnp.full((rows, k), sp.image_pad, jnp.int32)
    theta_q = run.gaussians(s["raw"][:, None], cells_b[:, :1], weight)
    u_q = theta_q.shift + theta_q.scale * eps[:, :1]
    guess = jnp.concatenate([u_q, eps[:, 1:]], axis=1)  # STARFlow's initial guess: the noise itself
    base = s["caches"].index

    def feed(caches, u, upto):
      return run.step(caches, pads[:, :upto], run.dup(u), ones[:, :upto], pos[:, :upto],
                      ones[:, :upto], running[:, :upto])

    def body(st):
      it, u_old, _, _, _ = st
      c2, _, raw_c = feed(s["caches"].rewind(base), u_old[:, :-1], k - 1)  # params of q+1 .. q+k-1
      raw_all = jnp.concatenate([s["raw"][:, None], raw_c], axis=1)
      theta = run.gaussians(raw_all, cells_b, weight)
      u_new = theta.shift + theta.scale * eps
      delta = jnp.mean(jnp.square(u_new - u_old)) / jnp.maximum(jnp.mean(jnp.square(u_new)), 1e-30)
      return it + 1, u_new, delta, c2, raw_all

    def cond(st):
      it, _, delta, _, _ = st
      return (it == 0) | ((delta >= jac.threshold) & (it < jac.max_iter))

    init = (jnp.zeros((), jnp.int32), guess, jnp.asarray(jnp.inf, fdt), s["caches"],
            jnp.zeros((rows, k, s["raw"].shape[-1]), fdt))
    iters, u, _, stale, raw_used = jax.lax.while_loop(cond, body, init)
    if jac.exact_cache:
      caches, logits, raw = feed(s["caches"].rewind(base), u, k)
    else:  # the reference: the last iteration's caches (from the previous iterate), then the last token
      caches, logits, raw = run.step(stale, pads[:, -1:], run.dup(u[:, -1:]), ones[:, -1:],
                                     pos[:, -1:], ones[:, -1:], running[:, -1:])
    logits_hist = jnp.concatenate([s["logits"][:, None], logits[:, :-1]], axis=1)
    s = trace(s, s["i"], logits_hist if jac.exact_cache else jnp.repeat(logits, k, 1), raw_used)
    s = record(s, s["i"], k, jnp.full((b, k), sp.image_pad), jnp.ones((b, k), bool), pos,
               jnp.ones((b, k), bool), jnp.broadcast_to(s["images"][:, None], (b, k)), cells_b)
    latents = jax.vmap(lambda lat, im, uu: jax.lax.dynamic_update_slice(
        lat, uu[None].astype(lat.dtype), (im, cell0, 0)))(s["latents"], s["images"], u)
    cell_next = s["cell"] + k
    return dict(s, i=s["i"] + k, caches=caches, logits=logits[:, -1], raw=raw[:, -1],
                mode=jnp.where(cell_next == n_lat, END, IMAGE).astype(jnp.int32), cell=cell_next,
                count=s["count"] + k, lengths=s["lengths"] + k, latents=latents,
                jacobi_iters=s["jacobi_iters"].at[s["chunk"]].set(iters), chunk=s["chunk"] + 1)

  def body(s):
    if g.jacobi is None:
      return sequential(s)
    aligned = (jnp.all((s["mode"] == IMAGE) & ~s["done"]) & jnp.all(s["cell"] == s["cell"][0])
               & (s["cell"][0] % g.jacobi.block_size == 0) & (s["i"] + g.jacobi.block_size <= m))
    return jax.lax.cond(aligned, jacobi_chunk, sequential, s)

  def cond(s):
    return (s["i"] < m) & ~jnp.all(s["done"])

  final = jax.lax.while_loop(cond, body, state)
  keys = ("tokens", "valid", "positions", "is_image", "image_slot", "image_cell", "latents",
          "lengths", "jacobi_iters")
  out = {k: final[k] for k in keys}
  out["num_images"] = final["images"]
  if return_trace:
    out["logits"], out["raw"] = final["trace_logits"], final["trace_raw"]
  return out


@functools.partial(jax.jit, static_argnames=("model", "vlm", "gcfg", "cond_rows", "return_trace"))
def jitted_generate(model: Pretzel, vlm: Qwen2_5_VL, gcfg: GenerateConfig, params, vlm_params,
                    prompt: dict, rng: jax.Array, cond_rows: int, return_trace: bool = False,
                    weight=None) -> dict:
  """`generate` under jit (prompt without its static `cond_rows`, given here)."""
  return generate(model, vlm, gcfg, params, vlm_params, {**prompt, "cond_rows": cond_rows}, rng,
                  return_trace, weight)
