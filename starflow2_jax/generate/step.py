"""The joint cached step of STARFlow2 generation: T new positions through both streams (STARFLOW2.md
4.4, 7.1, 7.7), writing both KV caches. Prefill (T = prompt length) and decode (T = 1, or a Jacobi
chunk) are this one function. R rows (2B with guidance: [cond; uncond]), d_v the VLM width, d the flow
width, D = D_tok, V the vocabulary.

Per position (the teacher-forced forward of `pretzel.model`, cached):
  VLM input  E[token] at text positions, A(u) at image positions (u: the shallow output, i.e. the
             latent the deep stream generates: never re-encoded);
  y_vlm      the final-normed VLM state (and the raw residuals the skip taps read);
  flow input P_txt(y_vlm) at text positions, proj_in(u) + W_vlm y_vlm at image positions;
  outputs    logits = LMHead(y_vlm + W_D y_D) (float32) and the raw deep head proj_out(y_D) whose
             affine (soft clip, softplus) is the Gaussian of the NEXT latent.

The deep stream is the model's own (`Pretzel.deep_cached`: `deep_forward` with its KV cache).
`Caches` is the one cache pytree: the VLM stream's and the deep stream's `nn.KVCache` (same slots, same
write index: pads are masked keys in both).
"""
from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

from starflow2_jax.nn.attention import KVCache
from starflow2_jax.pretzel.config import PretzelConfig
from starflow2_jax.pretzel.model import Pretzel
from starflow2_jax.vlm.model import Qwen2_5_VL


@flax.struct.dataclass
class Caches:
  """vlm: KVCache [L_vlm, R, S, Hkv, Dh]; deep: KVCache [L_deep, R, S, H, Dh]."""
  vlm: KVCache
  deep: KVCache

  @classmethod
  def init(cls, cfg: PretzelConfig, rows: int, length: int) -> "Caches":
    return cls(vlm=cfg.vlm.init_cache(rows, length), deep=cfg.deep_trunk().init_cache(rows, length))

  @property
  def index(self) -> jax.Array:
    return self.vlm.index

  def rewind(self, index) -> "Caches":
    return Caches(vlm=self.vlm.rewind(index), deep=self.deep.rewind(index))


def joint_step(model: Pretzel, params, vlm: Qwen2_5_VL, vlm_params, caches: Caches, tokens, u,
               is_image, positions, valid, running):
  """T new positions per row.

  tokens [R, T] int32 (image_pad at latents); u [R, T, D] (0 at text positions); is_image, valid [R, T]
  bool (valid False: a pad, masked as a key); positions [R, T, 3] M-RoPE ids; running [R, T] int32 the
  1-D position (index among the row's real tokens; the deep stream's `deep_rope = "1d"` option).
  Returns (caches, logits [R, T, V] float32, raw [R, T, 2D])."""
  cfg = model.cfg
  r, t = tokens.shape
  variables = {"params": params}
  u = jnp.where(is_image[..., None], u.astype(cfg.flow_dtype), jnp.zeros((), cfg.flow_dtype))
  embeds = model.apply(variables, u.reshape(r * t, -1), method=Pretzel.adapt)
  index = jnp.where(is_image, jnp.arange(r * t, dtype=jnp.int32).reshape(r, t), -1)
  out = vlm.apply({"params": vlm_params}, tokens, positions=positions, valid=valid, cache=caches.vlm,
                  image_embeds=embeds, image_index=index, taps=cfg.vlm_taps(), return_logits=False)
  y_vlm = out["hidden"]
  states = {**out["taps"], cfg.vlm.num_layers: y_vlm}
  y_deep, raw, deep_cache = model.apply(
      variables, u, y_vlm, {i: states[i] for i, _ in cfg.skip_taps}, is_image, positions, running, valid,
      caches.deep, method=Pretzel.deep_cached)
  h = y_vlm + model.apply(variables, y_deep, method=Pretzel.text_skip).astype(y_vlm.dtype)
  logits = vlm.apply({"params": vlm_params}, h, method=Qwen2_5_VL.logits)
  return Caches(vlm=out["cache"], deep=deep_cache), logits, raw.astype(cfg.flow_dtype)
