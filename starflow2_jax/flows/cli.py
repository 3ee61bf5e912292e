"""Sampling a flow checkpoint to files: what `python -m launch.sample` runs for model_kind "flow".

Writes into a new or empty-of-outputs directory:
  samples.npy  float32 [N, H, W, C] images as the reverse pass returns them (no clipping or
               quantisation; denoised only with denoise=True)
  samples.png  a grid of the clipped images
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from starflow2_jax import ckpt, images
from starflow2_jax.errors import UserError
from starflow2_jax.flows.config import FlowConfig
from starflow2_jax.flows.guidance import Guidance
from starflow2_jax.flows.model import FlowModel
from starflow2_jax.flows.patchify import token_images
from starflow2_jax.flows.sampling import Jacobi, denoise, noise, reverse

OUTPUTS = ("samples.npy", "samples.png")


def abstract_variables(model: FlowModel):
  """Shapes of the model's variables without allocating them."""
  cfg = model.cfg
  tokens = jax.ShapeDtypeStruct((1, cfg.num_tokens, cfg.token_dim), jnp.float32)
  labels = jax.ShapeDtypeStruct((1,), jnp.int32) if cfg.num_classes else None
  ctx = (jax.ShapeDtypeStruct((1, 1, cfg.context_dim), jnp.float32) if cfg.context_dim else None)
  return nn.unbox(jax.eval_shape(
      lambda t, l, c: model.init(jax.random.key(0), t, l, c), tokens, labels, ctx))


def load_flow(checkpoint: str, config: ml_collections.ConfigDict | None = None):
  """-> (model, params, config), params the plain parameter tree (apply with {"params": params}; the
  convention of `vlm.chat.load_vlm` too). `config` overrides the stored one; the parameter shapes
  must match it (the error names every mismatching parameter)."""
  config = config or ckpt.load_config(checkpoint)
  model = FlowModel(FlowConfig.from_config(config.model))
  variables = ckpt.load_params(checkpoint, abstract_variables(model))
  return model, variables["params"], config


def _labels(cfg: FlowConfig, labels: Sequence[int] | None, num: int):
  if not labels:
    return jnp.full((num,), -1, jnp.int32) if cfg.num_classes else None
  if not cfg.num_classes:
    raise UserError("--labels given, but this model is unconditional (model.num_classes = 0)")
  bad = [l for l in labels if not -1 <= l < cfg.num_classes]
  if bad:
    raise UserError(f"labels must be in [-1, {cfg.num_classes - 1}] (-1 = unconditional), got {bad}")
  return jnp.asarray([labels[i % len(labels)] for i in range(num)], jnp.int32)


def guidance_from_config(sample: ml_collections.ConfigDict, parametrisation: str,
                         weight: float | None = None) -> Guidance:
  """The guidance of `config.sample` {guidance, guidance_rule ("" or absent: the model's own rule),
  cfg_anneal, attn_temp}; `weight` overrides sample.guidance. Training samples and launch.sample alike."""
  weight = float(sample.get("guidance", 0.0)) if weight is None else weight
  rule = sample.get("guidance_rule", "") or Guidance.for_model(parametrisation, weight).rule
  return Guidance(weight=weight, rule=rule, anneal=bool(sample.get("cfg_anneal", False)),
                  attn_temp=float(sample.get("attn_temp", 1.0)))


def sample_to_dir(checkpoint: str, out: str, *, num: int | None = None,
                  config: ml_collections.ConfigDict | None = None, noise_path: str | None = None,
                  labels: Sequence[int] | None = None, guidance: float | None = None,
                  denoise_samples: bool = False, temperature: float = 1.0, seed: int = 0,
                  jacobi: Jacobi | None = None) -> dict:
  """Sample `num` images (or as many as the noise file has rows) and write OUTPUTS to `out`."""
  out = os.path.abspath(os.path.expanduser(out))
  existing = [f for f in OUTPUTS if os.path.exists(os.path.join(out, f))]
  if existing:
    raise FileExistsError(f"{out} already holds {existing}; choose a new --out")
  model, params, config = load_flow(checkpoint, config)
  variables = {"params": params}
  cfg = model.cfg
  if noise_path is not None:
    z = np.load(noise_path)
    want = (num or (z.shape[0] if z.ndim == 3 else None), cfg.num_tokens, cfg.token_dim)
    if z.ndim != 3 or tuple(z.shape) != want:
      raise UserError(f"--noise {noise_path}: expected shape [N, T, D] = {list(want)} in the model's "
                      f"token layout, found {list(z.shape)}")
    z = jnp.asarray(z, jnp.float32)
  else:
    if not num:
      raise UserError("pass --num (or --noise=FILE.npy)")
    z = noise(jax.random.key(seed), num, cfg.num_tokens, cfg.token_dim, temperature)
  num = z.shape[0]
  g = guidance_from_config(config.get("sample", ml_collections.ConfigDict()), cfg.parametrisation,
                           guidance)
  y = _labels(cfg, labels, num)
  run = jax.jit(functools.partial(reverse, model, guidance=g, jacobi=jacobi))
  x, info = run(variables, z, y)
  if denoise_samples:
    x = jax.jit(functools.partial(denoise, model))(variables, x, y)
  imgs = np.asarray(token_images(cfg, x), np.float32)
  os.makedirs(out, exist_ok=True)
  np.save(os.path.join(out, "samples.npy"), imgs)
  images.save_grid(os.path.join(out, "samples.png"), imgs)
  record = {"out": out, "num": num, "guidance": g.weight, "rule": g.rule,
            "denoised": denoise_samples}
  if "jacobi_iters" in info:
    record["mean_jacobi_iters"] = float(jnp.mean(info["jacobi_iters"]))
  return record
