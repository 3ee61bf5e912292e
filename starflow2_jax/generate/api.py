"""Whole STARFlow2 requests on a loaded model: text-to-image, understanding, interleaved documents.

  gen = Generator.from_checkpoint("/ckpt/params_0000200")     # launch.train's export (model_kind
                                                              # starflow2) or any params checkpoint
  out = gen.run("text_to_image", ["a red circle"], seed=0, guidance=3.6)
  out["images"][0][0]        # float32 [S, S, 3] in [0, 1]: row 0's first image
  gen.run("understanding", ["What is this?"], images=uint8 [B, S, S, 3])["text"]
  gen.run("interleaved", ["Draw two shapes and describe them"])

The frozen VLM and FAE are rebuilt from the stored config exactly as training built them (their
checkpoints, or the seeded random init of tiny configs: `train.pretzel_task.frozen_vlm / frozen_fae`).

Devices: like the train step and evaluation, generation runs on the config's mesh
(`parallel.make_mesh(config.mesh)`: every device by default; `build(mesh=...)` to choose), the Pretzel
and frozen params placed by the one logical-rules table, the conversations split over data x fsdp and
every jitted function traced inside `parallel.sharding_context`. A request of B conversations is padded
to a multiple of data x fsdp with copies of its last conversation (dropped from the results): rows are
independent (per-row noise), except Jacobi's convergence test, a mean over the whole (padded) batch so
that every device iterates equally. One process (results are gathered with `jax.device_get`).

Sampling settings (`config.sample`, all optional; arguments of `run` override):
  guidance (0: none; needs a model trained with data.caption_dropout > 0), guidance_rule ("" or
  "gaussian" | "linear"), cfg_anneal, temperature (image noise tau, 1), text_temperature (0 = greedy),
  top_p (1), max_new_tokens (512; text-to-image: N + 1), cache_len (data.max_len), jacobi_block (0 = off),
  jacobi_threshold (1e-3), jacobi_max_iter (32), jacobi_exact_cache (true), denoise ("score" | "none"),
  understanding_noise (true).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from starflow2_jax import ckpt, parallel
from starflow2_jax.errors import UserError
from starflow2_jax.flows.guidance import Guidance
from starflow2_jax.flows.sampling import Jacobi
from starflow2_jax.generate import decode, loop, prompts
from starflow2_jax.pretzel import config as pconfig, examples, model as pmodel
from starflow2_jax.pretzel.sequence import PretzelTransform, SequenceSpec
from starflow2_jax.pretzel.tokens import special_tokens
from starflow2_jax.train import pretzel_task
from starflow2_jax.vlm import tokenizer as tok_lib

MODEL_KIND = "starflow2"
_NOISE_STREAM = 2  # the understanding-noise sub-key of a request's seed (0, 1: the loop's streams)
# prompts are left-padded to a multiple of this many positions (capped by the cache): requests of
# similar lengths share one compiled generator
PROMPT_BUCKET = 32


def sample_settings(config: ml_collections.ConfigDict) -> dict:
  """config.sample with the defaults of the module docstring."""
  s = config.get("sample", ml_collections.ConfigDict())
  get = lambda k, d: s.get(k, d) if s.get(k, None) is not None else d  # noqa: E731
  return {"guidance": float(get("guidance", 0.0)),
          "guidance_rule": get("guidance_rule", "") or "gaussian",
          "cfg_anneal": bool(get("cfg_anneal", False)), "temperature": float(get("temperature", 1.0)),
          "text_temperature": float(get("text_temperature", 0.0)), "top_p": float(get("top_p", 1.0)),
          "max_new_tokens": int(get("max_new_tokens", 512)),
          "cache_len": int(get("cache_len", config.data.max_len)),
          "jacobi_block": int(get("jacobi_block", 0)),
          "jacobi_threshold": float(get("jacobi_threshold", 1e-3)),
          "jacobi_max_iter": int(get("jacobi_max_iter", 32)),
          "jacobi_exact_cache": bool(get("jacobi_exact_cache", True)), "denoise": get("denoise", "score"),
          "understanding_noise": bool(get("understanding_noise", True))}


def guidance_for(config: ml_collections.ConfigDict, settings: dict) -> Guidance:
  """The request's Guidance; UserError for guidance on a model that never learnt the null prompt."""
  g = Guidance(weight=settings["guidance"], rule=settings["guidance_rule"], anneal=settings["cfg_anneal"])
  dropout = float(config.data.get("caption_dropout", 0.0))
  if g.active and dropout <= 0:
    raise UserError(f"guidance={g.weight} needs the null prompt, but this model was trained with "
                    f"data.caption_dropout={dropout} (it never saw the null template); use guidance=0 "
                    "or a model trained with caption dropout")
  return g


def prompt_transform(config: ml_collections.ConfigDict, cfg: pconfig.PretzelConfig,
                     tokenizer_path: str) -> PretzelTransform:
  """The training sequences' tokenisation for prompts (never cut, never caption-dropped)."""
  spec = dataclasses.replace(
      SequenceSpec.from_config(config.data, cfg.token_grid, config.vlm.get("image_positions", "mrope")),
      max_len=1 << 30, max_images=1 << 10, caption_dropout=0.0)
  return PretzelTransform(spec, tokenizer_path)


def document_parts(ids: Sequence[int], specials, decode, in_image: bool = False) -> list:
  """Generated ids -> the document: text pieces (str, from decode(ids), empty ones dropped) and image
  indices (int: the k-th generated image), in order. in_image: the prompt ended with <|vision_start|>
  (the ids begin with image 0's latents). An image cut off by max_new_tokens (no <|vision_end|>) is left
  out: it is not among the finished images that `run` decodes."""
  parts, text, k, inside = ([0], [], 1, True) if in_image else ([], [], 0, False)

  def flush():
    piece = decode(text) if text else ""
    if piece:
      parts.append(piece)

  for i in ids:
    if i == specials.vision_start:
      flush()
      text, inside = [], True
      parts.append(k)
      k += 1
    elif i == specials.vision_end:
      inside = False
    elif not inside:
      text.append(i)
  flush()
  if inside:
    parts.pop()  # the unfinished image's index
  return parts


@dataclasses.dataclass
class Generator:
  """A loaded STARFlow2 model: the Pretzel (`model`, `params`), the frozen VLM and FAE, the prompt
  builder (the training tokenisation), the experiment config, and where it runs: the mesh and the
  logical rules its params are placed by (every request is traced inside `parallel.sharding_context`)."""
  config: ml_collections.ConfigDict
  model: pmodel.Pretzel
  params: dict
  vlm: object
  vlm_params: dict
  fae: object
  fae_params: dict
  transform: PretzelTransform
  mesh: jax.sharding.Mesh
  rules: tuple

  @classmethod
  def from_checkpoint(cls, checkpoint: str, mesh: jax.sharding.Mesh | None = None) -> "Generator":
    config = ckpt.load_config(checkpoint)
    kind = config.get("model_kind")
    if kind != MODEL_KIND:
      raise UserError(f"{checkpoint}: config.model_kind={kind!r}, expected {MODEL_KIND!r}")

    def load(abstract, shardings):
      return ckpt.load_params(checkpoint, {"params": abstract}, {"params": shardings})["params"]
    return cls.build(config, load, mesh)

  @classmethod
  def build(cls, config: ml_collections.ConfigDict, load_params=None,
            mesh: jax.sharding.Mesh | None = None) -> "Generator":
    """From an experiment config; load_params(abstract tree, shardings) -> params (None: the seeded
    init); mesh: None for the config's (`parallel.make_mesh(config.mesh)`)."""
    if mesh is None:
      mesh = parallel.make_mesh(config.get("mesh", None) or parallel.default_mesh_config())
    rules = parallel.logical_rules(config)
    seed = int(config.train.seed)
    rng = jax.random.key(seed)
    tk_path = pretzel_task.tokenizer_path(config.tokenizer)
    tokenizer = tok_lib.load_tokenizer(tk_path)
    # the seeds `pretzel_task.build` gives the random stand-ins of tiny configs
    vlm, vlm_params, qcfg = pretzel_task.frozen_vlm(config, mesh, rules,
                                                    [seed, pretzel_task.VLM_STREAM])
    fae, fae_params = pretzel_task.frozen_fae(config, mesh, rules, [seed, pretzel_task.FAE_STREAM])
    cfg = pconfig.from_config(config, vlm=qcfg, latent_grid=fae.grid, latent_channels=fae.channels,
                              text_vocab=tokenizer.get_vocab_size(with_added_tokens=True),
                              specials=special_tokens(tokenizer))
    model = pmodel.Pretzel(cfg)
    init = lambda r: pmodel.init_params(model, r)  # noqa: E731
    abstract = jax.eval_shape(init, rng)
    shardings = parallel.logical_to_shardings(abstract, mesh, rules)
    if load_params is None:
      with parallel.sharding_context(mesh, rules):
        params = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
    else:
      params = load_params(nn.unbox(abstract), shardings)
    return cls(config, model, params, vlm, vlm_params, fae, fae_params,
               prompt_transform(config, cfg, tk_path), mesh, rules)

  # -- pieces ------------------------------------------------------------------------------------
  @property
  def cfg(self):
    return self.model.cfg

  @property
  def builder(self):
    return self.transform.builder

  def settings(self, **overrides) -> dict:
    s = sample_settings(self.config)
    s.update({k: v for k, v in overrides.items() if v is not None})
    return s

  def check_images(self, images) -> np.ndarray:
    images = np.asarray(images)
    size = self.fae.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
      raise UserError(f"input images: expected uint8 [B, {size}, {size}, 3] (the FAE's fae.image_size="
                      f"{size}, RGB), found {images.dtype} {list(images.shape)}; resize them to "
                      f"{size}x{size}")
    return images

  # -- a whole request ---------------------------------------------------------------------------
  def run(self, kind: str, texts: Sequence[str], images=None, seed: int = 0, **overrides) -> dict:
    """kind: one of prompts.KINDS; texts: one caption / question / prompt per conversation; images:
    uint8 [B, S, S, 3] (understanding only). overrides: any key of `sample_settings`.
    Returns {prompt_ids: [list per row], generated_ids: [list per row (latents as <|image_pad|>)],
    text: [str per row] (the generated text, specials dropped), images: [[float32 [S, S, 3]] per row],
    jacobi_iters: [int per chunk] (Jacobi only)}."""
    if kind not in prompts.KINDS:
      raise UserError(f"generation kind {kind!r}: expected one of {prompts.KINDS}")
    s = self.settings(**overrides)
    if s["denoise"] not in decode.DENOISE:
      raise UserError(f"sample.denoise={s['denoise']!r}: expected one of {decode.DENOISE}")
    g = guidance_for(self.config, s)
    texts = list(texts)
    n = len(texts)
    if kind == "understanding":
      if images is None or len(images) != n:
        raise UserError(f"understanding needs one input image per question: {n} question(s), "
                        f"{0 if images is None else len(images)} image(s)")
      images = self.check_images(images)
    elif images is not None:
      raise UserError(f"input images are for understanding prompts, not {kind!r}")
    pad = -n % parallel.batch_shards(self.mesh)  # copies of the last conversation, dropped below
    texts = texts + texts[-1:] * pad
    if images is not None:
      images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
    with parallel.sharding_context(self.mesh, self.rules):
      out = self._run(kind, texts, images, int(seed), s, g)
    return {k: v[:n] if k != "jacobi_iters" else v for k, v in out.items()}

  def _place(self, tree):
    """Host arrays [R, ...] -> the mesh, rows over data x fsdp (R a multiple of data x fsdp)."""
    return jax.tree.map(lambda a: jax.device_put(a, parallel.batch_sharding(self.mesh, np.ndim(a))), tree)

  def _run(self, kind: str, texts: list, images, seed: int, s: dict, g: Guidance) -> dict:
    """`run` on B conversations (a multiple of data x fsdp), inside the mesh's sharding context."""
    cfg, sp = self.cfg, self.cfg.specials
    b = len(texts)
    key = jax.random.key(seed)
    u_images = None
    if kind == "understanding":
      u_images = _jit_inputs(self.model, self.fae, s["understanding_noise"])(
          self.params, self.fae_params, self._place(images), jax.random.fold_in(key, _NOISE_STREAM))
    guided = g.active and kind != "understanding"
    rows = [prompts.prompt_tokens(self.builder, kind, t) for t in texts]
    if guided:
      rows += [prompts.prompt_tokens(self.builder, kind, t, null=True) for t in texts]
      u_images = None if u_images is None else jnp.concatenate([u_images, u_images])
    m = cfg.num_latents + 1 if kind == "text_to_image" else s["max_new_tokens"]
    batch = prompts.batch(self.builder, rows, s["cache_len"], m, PROMPT_BUCKET)
    p = self._place(prompts.with_input_latents(batch, cfg.token_dim, u_images))
    jac = (Jacobi(s["jacobi_block"], s["jacobi_threshold"], s["jacobi_max_iter"], s["jacobi_exact_cache"])
           if s["jacobi_block"] else None)
    if kind == "understanding":  # no image is generated: <|vision_start|> is never sampled
      max_images, jac = 0, None
    else:
      max_images = 1 if kind == "text_to_image" else int(self.config.data.max_images)
    gcfg = loop.GenerateConfig(
        specials=sp, max_new_tokens=m, max_images=max_images,
        stop_after_images=1 if kind == "text_to_image" else 0, text_temperature=s["text_temperature"],
        top_p=s["top_p"], temperature=s["temperature"],
        guidance=g if guided else Guidance(rule=g.rule), jacobi=jac,
        image_positions=self.builder.spec.image_positions)
    res = jax.device_get(loop.jitted_generate(self.model, self.vlm, gcfg, self.params, self.vlm_params,
                                              p, key, b))
    out = {"prompt_ids": [r.tolist() for r in rows[:b]], "generated_ids": [], "parts": [], "text": [],
           "images": self._images(batch, res, u_images, s, jac)}
    for r in range(b):
      ids = res["tokens"][r][res["valid"][r]].tolist()
      out["generated_ids"].append(ids)
      out["parts"].append(self.parts(ids, in_image=rows[r][-1] == sp.vision_start))
      out["text"].append("".join(p for p in out["parts"][-1] if isinstance(p, str)))
    if jac is not None:
      out["jacobi_iters"] = [int(i) for i in res["jacobi_iters"] if i >= 0]
    return out

  def parts(self, ids: Sequence[int], in_image: bool = False) -> list:
    """`document_parts` of generated ids with this generator's specials and tokenizer."""
    decode = lambda t: self.builder.tk.decode(t, skip_special_tokens=True)  # noqa: E731
    return document_parts(ids, self.cfg.specials, decode, in_image)

  def _images(self, batch: dict, res: dict, u_images, s: dict, jac) -> list:
    """Every generated image: shallow inversion, denoising, FAE decode -> [[float32 [S, S, 3]] per row]."""
    b, num = res["latents"].shape[:2]
    counts = np.asarray(res["num_images"])
    if not counts.any():
      return [[] for _ in range(b)]
    lat = res["latents"]
    x, _ = _jit_inverse(self.model, jac)(self.params, self._place(lat.reshape(b * num, *lat.shape[2:])))
    x = x.reshape(lat.shape)
    if s["denoise"] == "score":
      cond = {k: np.asarray(v)[:b] for k, v in batch.items()}
      inputs, u = self._place(prompts.full_sequence(cond, dict(res, positions=res["positions"][:b]),
                                                    None if u_images is None else u_images[:b]))
      p0 = 0 if u_images is None else u_images.shape[1]
      x = jnp.stack([_jit_denoise(self.model, self.vlm)(self.params, self.vlm_params, inputs, u,
                                                        jnp.int32(p0 + k), x[:, k]) for k in range(num)], 1)
    pixels = np.asarray(_jit_pixels(self.model, self.fae)(self.fae_params, x.reshape(b * num, *x.shape[2:])))
    pixels = pixels.reshape(b, num, *pixels.shape[1:])
    return [[pixels[r, k] for k in range(int(counts[r]))] for r in range(b)]


@functools.lru_cache(maxsize=None)
def _jit_inputs(model, fae, noise: bool):
  def f(params, fae_params, images, rng):
    return decode.input_latents(model, params, fae, fae_params, images, rng, noise)
  return jax.jit(f)


@functools.lru_cache(maxsize=None)
def _jit_inverse(model, jacobi):
  return jax.jit(functools.partial(decode.shallow_inverse, model, jacobi=jacobi))


@functools.lru_cache(maxsize=None)
def _jit_denoise(model, vlm):
  def f(params, vlm_params, inputs, u_all, slot, x):
    return decode.score_denoise(model, params, vlm, vlm_params, inputs, u_all, slot, x)
  return jax.jit(f)


@functools.lru_cache(maxsize=None)
def _jit_pixels(model, fae):
  return jax.jit(functools.partial(decode.to_pixels, model, fae))


def held_out_captions(config: ml_collections.ConfigDict, num: int) -> list[str]:
  """The captions of the first `num` text-to-image records of the held-out split (data.eval_split),
  cycled when it holds fewer."""
  source = examples.kind_sources(config.data, config.data.eval_split, ["text_to_image"])[0]
  records = source["text_to_image"]
  if not len(records):
    raise UserError(f"config.log.num_samples={num}: the held-out split data.eval_split="
                    f"{config.data.eval_split!r} has no records to take captions from; set "
                    "log.num_samples=0 or give the split records")
  return [records[i % len(records)]["caption"] for i in range(num)]


def training_sampler(config: ml_collections.ConfigDict, model: pmodel.Pretzel, vlm, fae,
                     tokenizer_path: str, mesh: jax.sharding.Mesh, rules):
  """`Task.sample_fn` of model_kind starflow2 (config.log.num_samples > 0): text-to-image samples of
  the held-out captions (`held_out_captions`) with the settings of config.sample, the request's seed
  drawn from rng -> float32 [num, S, S, 3] in [-1, 1] (the loop's image writer)."""
  transform = prompt_transform(config, model.cfg, tokenizer_path)

  def sample_fn(params, frozen, rng, num):
    gen = Generator(config, model, params, vlm, frozen["vlm"], fae, frozen["fae"], transform, mesh, rules)
    seed = int(jax.random.randint(rng, (), 0, np.iinfo(np.int32).max))
    out = gen.run("text_to_image", held_out_captions(config, num), seed=seed)
    return np.stack([row[0] for row in out["images"]]).astype(np.float32) * 2.0 - 1.0
  return sample_fn
