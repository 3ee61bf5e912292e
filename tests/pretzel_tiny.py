"""The tiny Pretzel of REFERENCE-BEHAVIOURS.md (ground rules) and hand-built sequences for the tests.

VLM: the tiny Qwen2.5-VL language model (vocab 256, hidden 64, 2 layers, 4 query / 2 KV heads of 16,
M-RoPE [2, 3, 3]); flow: width 32, 2 heads of 16, deep 2 layers with sections [2, 3, 3], 2 shallow blocks
of 1 layer; latent grid 4x4 with D_tok = 4 (N = 16); adapter hidden 64.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import qwen2_5_vl_tiny  # noqa: E402
from starflow2_jax.pretzel import config as pconfig, model as pmodel  # noqa: E402
from starflow2_jax.vlm.model import Qwen2_5_VL, abstract_params  # noqa: E402
from starflow2_jax.vlm.positions import mrope_positions  # noqa: E402

IMAGE, VSTART, VEND, PAD = 250, 252, 253, 0
GRID = (4, 4)
N = GRID[0] * GRID[1]
D_TOK = 4
PERTURB = 0.3  # random non-zero weights everywhere (zero inits hide bugs)
VLM_STD = 0.1


def tiny_config(**overrides) -> pconfig.PretzelConfig:
  fields = dict(width=32, head_dim=16, deep_layers=2, shallow_blocks=2, shallow_layers=1,
                deep_rope_sections=(2, 3, 3), adapter_hidden=64)
  fields.update(overrides)
  dtype = fields.get("param_dtype", "float32")
  vlm = pconfig.qwen_config(qwen2_5_vl_tiny.get_config())
  if dtype != "float32":
    vlm = dataclasses.replace(vlm, dtype=dtype, param_dtype=dtype)
  return pconfig.PretzelConfig(vlm=vlm, latent_grid=GRID, latent_channels=D_TOK, text_vocab=256,
                               **fields)


def perturbed(params, seed: int = 0, scale: float = PERTURB):
  """params + scale * N(0, 1) noise on every leaf (NumPy: no compilation)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + scale * rng.normal(size=x.shape), x.dtype),
                      params)


@functools.lru_cache(maxsize=None)
def model_of(**overrides):
  """(cfg, Pretzel, Qwen2_5_VL) of a tiny config (no parameters)."""
  cfg = tiny_config(**overrides)
  return cfg, pmodel.Pretzel(cfg), Qwen2_5_VL(cfg.vlm)


@functools.lru_cache(maxsize=None)
def build(**overrides):
  """(cfg, model, vlm, production-init params, random VLM params) of a tiny config. The VLM weights
  are N(0, 0.1^2), norm scales 1 + N(0, 0.1^2) (NumPy, from the abstract shapes)."""
  cfg, model, vlm = model_of(**overrides)
  params = jax.jit(lambda r: nn.unbox(pmodel.init_params(model, r)))(jax.random.key(0))
  rng = np.random.default_rng(1)
  abstract = nn.unbox(abstract_params(cfg.vlm))

  def leaf(path, x):
    noise = VLM_STD * rng.normal(size=x.shape)
    is_norm = any("norm" in str(k) for k in path)
    return jnp.asarray(1.0 + noise if is_norm else noise, x.dtype)

  return cfg, model, vlm, params, jax.tree_util.tree_map_with_path(leaf, abstract)


def sequence(rows, length: int, num_images: int, seed: int = 0) -> dict:
  """Hand-built batch in the pretzel-seq contract. rows: per row a list of packed segments, each a list
  of items: an int k (k random text tokens) or ("img", flow_loss) (an image span). Text tokens are
  supervised when the next token is text of the same segment (not <|vision_end|>)."""
  rng = np.random.default_rng(seed)
  b = len(rows)
  out = {k: np.zeros((b, length), np.int32) for k in ("tokens", "segment_ids")}
  out["positions"] = np.zeros((b, length, 3), np.int32)
  out["is_image"] = np.zeros((b, length), bool)
  out["image_slot"] = np.full((b, length), -1, np.int32)
  out["image_cell"] = np.full((b, length), -1, np.int32)
  out["image_valid"] = np.zeros((b, num_images), bool)
  out["image_flow_loss"] = np.zeros((b, num_images), bool)
  for r, segments in enumerate(rows):
    t, slot = 0, 0
    for s, items in enumerate(segments, 1):
      toks, slots = [], []
      for it in items:
        if isinstance(it, int):
          toks += list(rng.integers(3, 250, it))
          slots += [-1] * it
        else:
          toks += [VSTART] + [IMAGE] * N + [VEND]
          slots += [-1] + [slot] * N + [-1]
          out["image_valid"][r, slot] = True
          out["image_flow_loss"][r, slot] = it[1]
          slot += 1
      n = len(toks)
      toks = np.asarray(toks)
      grids = [GRID] * int(np.sum(toks == VSTART))
      out["positions"][r, t:t + n] = mrope_positions(toks[None], None, grids, IMAGE)[0][0]
      out["tokens"][r, t:t + n] = toks
      out["segment_ids"][r, t:t + n] = s
      sl = np.asarray(slots)
      out["is_image"][r, t:t + n] = sl >= 0
      out["image_slot"][r, t:t + n] = sl
      cells = np.zeros(n, np.int32)
      for k in set(sl[sl >= 0]):
        cells[sl == k] = np.arange(N)
      out["image_cell"][r, t:t + n] = np.where(sl >= 0, cells, -1)
      t += n
    assert t <= length, (t, length)
  nxt = np.concatenate([out["tokens"][:, 1:], np.full((b, 1), PAD, np.int32)], 1)
  nseg = np.concatenate([out["segment_ids"][:, 1:], np.zeros((b, 1), np.int32)], 1)
  nimg = np.concatenate([out["is_image"][:, 1:], np.zeros((b, 1), bool)], 1)
  out["tokens"] = np.where(out["is_image"], IMAGE, out["tokens"]).astype(np.int32)
  out["targets"] = np.where(nseg == out["segment_ids"], nxt, PAD).astype(np.int32)
  out["target_mask"] = ((out["segment_ids"] > 0) & (nseg == out["segment_ids"]) & ~out["is_image"]
                        & ~nimg & (nxt != VEND))
  return out


def inputs_of(batch: dict) -> dict:
  return {k: jnp.asarray(batch[k]) for k in pmodel.INPUT_KEYS}


def latents(batch_size: int, num_images: int, seed: int = 0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), (batch_size, num_images, N, D_TOK), dtype)


@functools.lru_cache(maxsize=None)
def forward_fn(mode: str = "full", **overrides):
  """One jitted forward per (mode, config), shared by the test files: f(params, vlm_params, inputs,
  x, du=None) -> (PretzelOutput, the VLM-only logits on the same input embeddings); du [B, I, N, D]
  is added to the shallow output u (perturbations of the causal stream)."""
  _, model, vlm = model_of(**overrides)

  def f(params, vlm_params, inputs, x, du=None):
    u, logdets, outs = model.apply({"params": params}, x, method=pmodel.Pretzel.shallow_forward)
    if du is not None:
      u = u + du
    out = pmodel.forward_from_u(model, params, vlm, vlm_params, inputs, u, mode, (logdets, outs))
    text = vlm.apply({"params": vlm_params}, inputs["tokens"], method=vlm.embed)
    embeds = jnp.where(inputs["is_image"][..., None], out.vlm_inputs, text)
    alone = vlm.apply({"params": vlm_params}, embeds=embeds, positions=inputs["positions"],
                      segment_ids=inputs["segment_ids"])["logits"]
    return out, alone

  return jax.jit(f)
