"""The Pretzel model: the frozen VLM stream and the trainable flow stream over one token sequence
(STARFLOW2.md 4.4). B rows of L positions; I image slots per row, each of N latent tokens of D_tok
channels (raster order over the token grid); d_v the VLM width, d the flow width.

Per position t (teacher forcing):
  1. shallow flow per image (each image an independent sequence): u = f_S(x), x [B, I, N, D_tok];
  2. VLM input e_t = E[token_t] at text positions, A(u_t) at image positions (the adapter output
     replaces the embedding);
  3. frozen VLM: y_vlm,t (final-normed) and, for `skip_taps`, raw residuals h^(i);
  4. flow input c_t = P_txt(y_vlm,t) at text positions, proj_in(u_t) + W_vlm y_vlm,t at image ones
     (+ a learned table row of the latent's grid cell with `image_pos_table`);
  5. deep stream over c (causal within each packed segment), y_D = RMSNorm(h_D), plus the taps
     P_ij h^(i) added to its residual before deep layer j;
  6. text logits LMHead(y_vlm + W_D y_D) (frozen head, float32);
  7. Gaussians softclip_4(proj_out(y_D)), sigma = softplus(a + 0.5413) (float32, highest precision);
  8. next-position alignment: the latent at position q uses the parameters of position q - 1 (for the
     first latent of a span, its <|vision_start|>): z_q = (u_q - mu_{q-1}) / sigma_{q-1}.
The sequence is causal in u, not in x (the Flip shallow block): `forward_from_u` is the causal part.

Trainable parameters (top-level names = parameter groups, `pretzel.stages`):
  shallow_<k>/...   FlowBlock k (STARFlow parametrisation, own SOS, 2-D RoPE)
  deep/{proj_in, p_txt, transformer/stack/..., final_norm, proj_out, image_pos [N, d] (with
        `image_pos_table`)}
  adapter/{fc1, fc2}   fc2 zero-initialised (weight and bias)
  w_vlm/kernel [d_v, d], w_d/kernel [d, d_v]   zero-initialised, no bias
  taps/tap_<k>/kernel [d_v, d]   one per `skip_taps` pair, zero-initialised (absent without taps)
The VLM parameters are a separate argument (the frozen tree), never part of `params`.

Modes (static): "full" (stage 3, evaluation), "nf" (stage 1: no logits; the VLM runs on the first
`stage1_vlm_prefix` positions only when that is set), "ntp" (stage 2: no deep stream; exact while
W_D = 0, logits = LMHead(y_vlm)).
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from starflow2_jax import nn as snn
from starflow2_jax.flows.block import FlowBlock, affine_from_raw
from starflow2_jax.pretzel.config import PretzelConfig
from starflow2_jax.vlm.model import Qwen2_5_VL

MODES = ("full", "nf", "ntp")
IMAGE_POS_INIT_STD = 0.02  # the `image_pos_table` rows' initial std (TarFlow's table: 0.01)
INPUT_KEYS = ("tokens", "positions", "segment_ids", "is_image", "image_slot", "image_cell")


@flax.struct.dataclass
class PretzelOutput:
  """Teacher-forced outputs. Sequence fields [B, L, ...]; image fields [B, I, N, D_tok].

  logits [B, L, V] float32 (None in mode "nf"); y_vlm [B, L, d_v]; y_deep [B, L, d] (None in "ntp");
  theta: Affine [B, L, D_tok] of the latent AT each position (taken from the previous position);
  u_seq [B, L, D_tok] the latent at each image position (0 elsewhere); vlm_inputs [B, L, d_v];
  z [B, I, N, D_tok] deep outputs and deep_logdet [B, I, N, D_tok] (= -log sigma), scattered back to
  the images (None in "ntp"); u [B, I, N, D_tok] the shallow output (deep input);
  shallow_logdets / shallow_outputs: one [B, I, N, D_tok] per shallow block (log-dets in the block's
  order, outputs in raster order)."""
  logits: Any
  y_vlm: jax.Array
  y_deep: Any
  theta: Any
  u_seq: jax.Array
  vlm_inputs: jax.Array
  z: Any
  deep_logdet: Any
  u: jax.Array
  shallow_logdets: tuple
  shallow_outputs: tuple


def _zero_dense(features: int, axes, cfg: PretzelConfig, name: str) -> snn.Dense:
  return snn.Dense(features, axes, use_bias=False, dtype=cfg.compute_dtype,
                   param_dtype=cfg.params_dtype, kernel_init=nn.initializers.zeros, name=name)


class Adapter(nn.Module):
  """A: u [..., D_tok] -> [..., d_v]: Linear -> exact GELU -> Linear (zero-initialised output layer)."""
  cfg: PretzelConfig

  @nn.compact
  def __call__(self, u):
    cfg = self.cfg
    h = snn.Dense(cfg.adapter_width, ("latent", "mlp"), dtype=cfg.compute_dtype,
                  param_dtype=cfg.params_dtype, name="fc1")(u.astype(cfg.compute_dtype))
    return snn.Dense(cfg.vlm_width, ("mlp", "embed"), dtype=cfg.compute_dtype,
                     param_dtype=cfg.params_dtype, kernel_init=nn.initializers.zeros,
                     bias_init=nn.initializers.zeros, name="fc2")(jax.nn.gelu(h, approximate=False))


class DeepStream(nn.Module):
  """The deep flow block over the whole sequence. No SOS: position q - 1 predicts position q."""
  cfg: PretzelConfig

  def setup(self):
    cfg = self.cfg
    cdt, pdt = cfg.compute_dtype, cfg.params_dtype
    self.proj_in = snn.Dense(cfg.width, ("latent", "embed"), dtype=cdt, param_dtype=pdt)
    self.p_txt = snn.Dense(cfg.width, ("embed", "mlp"), dtype=cdt, param_dtype=pdt)
    self.transformer = snn.Transformer(cfg.deep_trunk())
    self.final_norm = snn.RMSNorm(eps=1e-6, scale_offset=1.0, dtype=cfg.flow_dtype, param_dtype=pdt)
    self.proj_out = snn.Dense(2 * cfg.token_dim, ("embed", "latent"), dtype=cfg.flow_dtype,
                              param_dtype=pdt, kernel_init=nn.initializers.zeros,
                              precision=jax.lax.Precision.HIGHEST)
    if cfg.image_pos_table:
      self.image_pos = self.param("image_pos", nn.with_logical_partitioning(
          nn.initializers.normal(IMAGE_POS_INIT_STD), (None, "embed")), (cfg.num_latents, cfg.width), pdt)

  def __call__(self, u_seq, y_vlm, image_skip, is_image, angles, positions, segment_ids,
               residual_adds, valid=None, cache=None):
    """u_seq [B, L, D_tok], y_vlm [B, L, d_v], image_skip [B, L, d] (W_vlm y_vlm), is_image [B, L],
    angles [B, L, head_dim/2], positions [B, L, 3] the M-RoPE ids (read by `image_pos_table`: each
    latent's grid cell), segment_ids [B, L] (None with a cache), residual_adds {0-based layer:
    [B, L, d]}; generation: valid [B, L] (False: a masked pad) and cache (nn.KVCache: L new positions
    after the cached ones)
    -> (y_D [B, L, d] final-normed, flow dtype; raw head output [B, L, 2 D_tok] float32; the new cache
    or None)."""
    cdt = self.cfg.compute_dtype
    img = self.proj_in(u_seq.astype(cdt)) + image_skip.astype(cdt)
    if self.cfg.image_pos_table:
      cells = grid_cells(positions, self.cfg.token_grid)
      img = img + jnp.take(self.image_pos, cells, axis=0).astype(cdt)
    txt = self.p_txt(y_vlm.astype(cdt))
    c = jnp.where(is_image[..., None], img, txt)
    h, cache, _ = self.transformer(c, angles=angles, segment_ids=segment_ids, valid=valid, cache=cache,
                                   residual_adds=residual_adds)
    y = self.final_norm(h)
    return y, self.proj_out(y), cache


class Taps(nn.Module):
  """One zero-initialised Linear d_v -> d per `skip_taps` pair (i, j)."""
  cfg: PretzelConfig

  @nn.compact
  def __call__(self, vlm_states: dict) -> dict:
    """vlm_states {VLM layer i: [B, L, d_v]} -> {0-based deep layer j - 1: [B, L, d]} (summed per j)."""
    adds: dict = {}
    for k, (i, j) in enumerate(self.cfg.skip_taps):
      v = _zero_dense(self.cfg.width, ("embed", "mlp"), self.cfg, f"tap_{k}")(vlm_states[i])
      adds[j - 1] = v if j - 1 not in adds else adds[j - 1] + v
    return adds


class Pretzel(nn.Module):
  """The trainable part of STARFlow2; `forward` / `forward_from_u` wire it to the frozen VLM."""
  cfg: PretzelConfig

  def setup(self):
    cfg = self.cfg
    fcfg = cfg.shallow_flow()
    self.shallow = [FlowBlock(fcfg, k, name=f"shallow_{k}") for k in range(cfg.shallow_blocks)]
    self.adapter = Adapter(cfg)
    self.deep = DeepStream(cfg)
    self.w_vlm = _zero_dense(cfg.width, ("embed", "mlp"), cfg, "w_vlm")
    self.w_d = _zero_dense(cfg.vlm_width, ("mlp", "embed"), cfg, "w_d")
    if cfg.skip_taps:
      self.taps = Taps(cfg)
    self.rope = cfg.deep_rope_spec()

  def shallow_forward(self, x):
    """x [B, I, N, D_tok] -> (u [B, I, N, D_tok], log-dets per block, outputs per block)."""
    b, i, n, d = x.shape
    u = x.reshape(b * i, n, d).astype(self.cfg.flow_dtype)
    logdets, outputs = [], []
    for block in self.shallow:
      u, ld, _ = block(u)
      logdets.append(ld.reshape(b, i, n, d))
      outputs.append(u.reshape(b, i, n, d))
    return u.reshape(b, i, n, d), tuple(logdets), tuple(outputs)

  def adapt(self, u):
    return self.adapter(u)

  def deep_forward(self, u_seq, y_vlm, vlm_states, is_image, positions, segment_ids):
    """-> (y_D [B, L, d], raw [B, L, 2 D_tok]); vlm_states {VLM layer i: [B, L, d_v]} for the taps;
    positions [B, L, 3] the M-RoPE ids."""
    adds = self.taps(vlm_states) if self.cfg.skip_taps else {}
    pos = positions if self.cfg.deep_rope == "mrope" else running_positions(segment_ids)
    y, raw, _ = self.deep(u_seq, y_vlm, self.w_vlm(y_vlm), is_image, self.rope.angles(pos), positions,
                          segment_ids, adds)
    return y, raw

  def deep_cached(self, u_seq, y_vlm, vlm_states, is_image, positions, running, valid, cache):
    """`deep_forward` on T new positions after a KV cache (generation): positions [B, T, 3] M-RoPE ids,
    running [B, T] the 1-D running positions (deep_rope "1d"); valid [B, T]
    -> (y_D [B, T, d], raw [B, T, 2 D_tok], the new cache)."""
    adds = self.taps(vlm_states) if self.cfg.skip_taps else {}
    pos = positions if self.cfg.deep_rope == "mrope" else running
    return self.deep(u_seq, y_vlm, self.w_vlm(y_vlm), is_image, self.rope.angles(pos), positions, None,
                     adds, valid=valid, cache=cache)

  def text_skip(self, y_deep):
    """W_D y_D [B, L, d_v]."""
    return self.w_d(y_deep.astype(self.cfg.compute_dtype))

  def init_all(self, x, inputs_shapes):
    """Touches every parameter (use as `method=` in `init`); inputs_shapes = (B, L)."""
    b, length = inputs_shapes
    cfg = self.cfg
    u, _, _ = self.shallow_forward(x)
    self.adapt(u)
    y = jnp.zeros((b, length, cfg.vlm_width), cfg.compute_dtype)
    states = {i: y for i, _ in cfg.skip_taps}
    y_d, _ = self.deep_forward(jnp.zeros((b, length, cfg.token_dim), cfg.flow_dtype), y, states,
                               jnp.zeros((b, length), bool), jnp.zeros((b, length, 3), jnp.int32),
                               jnp.ones((b, length), jnp.int32))
    return self.text_skip(y_d)


def grid_cells(positions: jax.Array, token_grid: tuple[int, int]) -> jax.Array:
  """M-RoPE ids [B, L, 3] -> the raster cell r W_g + c [B, L] int32 of a latent at (t, h, w) =
  (s, s + r, s + c) (STARFLOW2.md 4.3), clipped to the grid (text positions: 0). Needs Qwen's image
  positions (`pconfig.from_config` rejects `image_pos_table` with vlm.image_positions "1d")."""
  h, w = token_grid
  r = jnp.clip(positions[..., 1] - positions[..., 0], 0, h - 1)
  c = jnp.clip(positions[..., 2] - positions[..., 0], 0, w - 1)
  return (r * w + c).astype(jnp.int32)


def running_positions(segment_ids: jax.Array) -> jax.Array:
  """[B, L] -> [B, L] int32: the index of each position inside its segment (1-D RoPE option)."""
  idx = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
  start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                           segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  return idx - jax.lax.cummax(jnp.where(start, idx, 0), axis=1)


def init_params(model: Pretzel, rng: jax.Array, batch: int = 1, length: int = 2):
  """The (logically boxed) trainable parameters."""
  cfg = model.cfg
  x = jnp.zeros((batch, 1, cfg.num_latents, cfg.token_dim), cfg.flow_dtype)
  return model.init({"params": rng}, x, (batch, length), method=Pretzel.init_all)["params"]


def _image_index(inputs: dict, num_images: int, n: int) -> tuple[jax.Array, jax.Array]:
  """-> (flat index b*I*N + slot*N + cell at image positions (-1 elsewhere) [B, L],
  the same within a row, slot*N + cell (0 elsewhere) [B, L])."""
  is_img = inputs["is_image"]
  within = jnp.where(is_img, inputs["image_slot"] * n + inputs["image_cell"], 0).astype(jnp.int32)
  row = jnp.arange(is_img.shape[0], dtype=jnp.int32)[:, None] * (num_images * n)
  return jnp.where(is_img, row + within, -1), within


def _scatter_images(values: jax.Array, inputs: dict, num_images: int, n: int) -> jax.Array:
  """values [B, L, D] at image positions -> [B, I, N, D] (each image's latents in raster order)."""
  b, _, d = values.shape
  _, within = _image_index(inputs, num_images, n)
  slot = jnp.where(inputs["is_image"], within, num_images * n)  # non-image positions: a dropped slot
  out = jax.vmap(lambda v, s: jnp.zeros((num_images * n + 1, d), v.dtype).at[s].add(v))(values, slot)
  return out[:, :-1].reshape(b, num_images, n, d)


def _vlm(vlm: Qwen2_5_VL, vlm_params, inputs: dict, embeds_flat, image_index, taps, prefix: int):
  """The frozen VLM on the first `prefix` positions (0: all) -> (y_vlm [B, L, d_v], {i: h^(i)}),
  padded with zeros past the prefix."""
  length = inputs["tokens"].shape[1]
  n = min(prefix, length) if prefix else length
  cut = lambda a: a[:, :n]  # noqa: E731
  out = vlm.apply({"params": vlm_params}, cut(inputs["tokens"]), positions=cut(inputs["positions"]),
                  image_embeds=embeds_flat, image_index=cut(image_index), taps=taps,
                  segment_ids=cut(inputs["segment_ids"]), return_logits=False)
  pad = lambda a: a if n == length else jnp.pad(a, ((0, 0), (0, length - n), (0, 0)))  # noqa: E731
  return pad(out["hidden"]), {i: pad(h) for i, h in out["taps"].items()}


def forward_from_u(model: Pretzel, params, vlm: Qwen2_5_VL, vlm_params, inputs: dict, u: jax.Array,
                   mode: str = "full", shallow=((), ())) -> PretzelOutput:
  """The causal part: latents u [B, I, N, D_tok] (the shallow output) through the VLM and deep streams.

  inputs: the sequence fields of a batch (`INPUT_KEYS`: tokens [B, L], positions [B, L, 3],
  segment_ids [B, L], is_image [B, L], image_slot [B, L], image_cell [B, L]).
  shallow: (log-dets, outputs) of the shallow blocks, passed through to the output."""
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  cfg = model.cfg
  b, num_images, n, d = u.shape
  snn.check_shape("latent tokens u", u, (inputs["tokens"].shape[0], None, cfg.num_latents,
                                         cfg.token_dim))
  variables = {"params": params}
  apply = lambda method, *a: model.apply(variables, *a, method=method)  # noqa: E731
  u = u.astype(cfg.flow_dtype)
  is_img = inputs["is_image"]
  flat_index, within = _image_index(inputs, num_images, n)
  u_seq = jnp.take_along_axis(u.reshape(b, num_images * n, d), within[..., None], axis=1)
  u_seq = jnp.where(is_img[..., None], u_seq, jnp.zeros((), u_seq.dtype))
  embeds = apply(Pretzel.adapt, u.reshape(b * num_images * n, d))
  prefix = cfg.stage1_vlm_prefix if mode == "nf" else 0
  y_vlm, states = _vlm(vlm, vlm_params, inputs, embeds, flat_index, cfg.vlm_taps(), prefix)
  states[cfg.vlm.num_layers] = y_vlm
  vlm_inputs = jnp.where(is_img[..., None], jnp.take(embeds, jnp.maximum(flat_index, 0), axis=0),
                         jnp.zeros((), embeds.dtype))
  y_deep = theta = z = deep_ld = None
  if mode != "ntp":
    y_deep, raw = apply(Pretzel.deep_forward, u_seq, y_vlm, {i: states[i] for i, _ in cfg.skip_taps},
                        is_img, inputs["positions"], inputs["segment_ids"])
    raw = jnp.concatenate([jnp.zeros_like(raw[:, :1]), raw[:, :-1]], axis=1)  # q - 1 predicts q
    theta = affine_from_raw(raw.astype(cfg.flow_dtype), "starflow", cfg.soft_clip)
    z_seq = jnp.where(is_img[..., None], theta.forward(u_seq), 0.0)
    ld_seq = jnp.where(is_img[..., None], -theta.log_scale, 0.0)
    z = _scatter_images(z_seq, inputs, num_images, n)
    deep_ld = _scatter_images(ld_seq, inputs, num_images, n)
  logits = None
  if mode != "nf":
    h = y_vlm
    if mode == "full":
      h = y_vlm + apply(Pretzel.text_skip, y_deep).astype(y_vlm.dtype)
    logits = vlm.apply({"params": vlm_params}, h, method=Qwen2_5_VL.logits)
  return PretzelOutput(logits=logits, y_vlm=y_vlm, y_deep=y_deep, theta=theta, u_seq=u_seq,
                       vlm_inputs=vlm_inputs, z=z, deep_logdet=deep_ld, u=u,
                       shallow_logdets=tuple(shallow[0]), shallow_outputs=tuple(shallow[1]))


def forward(model: Pretzel, params, vlm: Qwen2_5_VL, vlm_params, inputs: dict, x: jax.Array,
            mode: str = "full") -> PretzelOutput:
  """The whole teacher-forced forward from the noisy normalised latent tokens x [B, I, N, D_tok]."""
  snn.check_shape("latent tokens x", x, (inputs["tokens"].shape[0], None, model.cfg.num_latents,
                                         model.cfg.token_dim))
  u, logdets, outputs = model.apply({"params": params}, x, method=Pretzel.shallow_forward)
  return forward_from_u(model, params, vlm, vlm_params, inputs, u, mode, (logdets, outputs))


__all__ = ["Pretzel", "PretzelOutput", "Adapter", "DeepStream", "Taps", "MODES", "INPUT_KEYS",
           "forward", "forward_from_u", "grid_cells", "init_params", "running_positions"]
