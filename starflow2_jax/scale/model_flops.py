"""Analytical model FLOPs of one train step (the whole global batch, all devices together).

  trained   6 N D: every matmul kernel [in, out] of a trained parameter costs 2 in out per token
            forward and twice that backward (input and weight gradients); N = trained kernel
            parameters (embedding tables, norms and biases are not matmuls), D = tokens per step
  frozen    2 N D for a frozen forward pass (a pretrained VLM / FAE)
  frozen_backward  2 N D more for a frozen component that gradients pass through (input gradients
            only: STARFlow2's VLM, between the trained adapter / shallow blocks and the loss)
  attention per layer and token, 4 T width forward (scores and values over all T keys: the causal
            mask is applied to a dense product, as the compiled kernels do), 3x that with backward

Model kinds register their own count (`KINDS`): "flow" (all blocks on the image tokens) and
"starflow2" (each component on its own tokens; see `_starflow2`). Any other kind is counted by its
parameters alone: 6ND trained + 2ND frozen over `tokens_per_example`, no attention term.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections

FORWARD_PER_PARAM_TOKEN = 2  # one multiply-add per kernel element and token
TRAIN_FACTOR = 3  # forward + backward (input and weight gradients) = 3 x forward
ATTENTION_FORWARD_PER_KEY = 4  # q.k and p.v: 2 x 2 FLOPs per (query, key, channel)


@dataclasses.dataclass(frozen=True)
class ModelFlops:
  trained: float
  frozen: float
  attention: float
  frozen_backward: float
  trained_params: int  # kernel parameters that train
  frozen_params: int  # kernel parameters of the frozen subtree
  tokens: int  # tokens per step

  @property
  def total(self) -> float:
    return self.trained + self.frozen + self.frozen_backward + self.attention


def kernel_params(tree: Any, mask: Any = None) -> int:
  """Elements of the matmul kernels (leaves whose path names a `kernel`) of a (boxed) tree, only the
  leaves where `mask` (bools like the tree) is True."""
  tree = nn.unbox(tree)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  keep = [True] * len(flat) if mask is None else jax.tree.leaves(mask)
  return sum(x.size for (path, x), k in zip(flat, keep) if k and "kernel" in jax.tree_util.keystr(path))


def _flow(config, params, trainable, frozen, tokens_per_example) -> ModelFlops:
  from starflow2_jax.flows import FlowConfig
  cfg = FlowConfig.from_config(config.model)
  batch, t = int(config.train.batch_size), cfg.num_tokens
  n = kernel_params(params, trainable)
  forward = ATTENTION_FORWARD_PER_KEY * batch * t * t * cfg.width * sum(cfg.layers_per_block)
  return ModelFlops(TRAIN_FACTOR * FORWARD_PER_PARAM_TOKEN * n * batch * t, 0.0,
                    TRAIN_FACTOR * forward, 0.0, n, 0, batch * t)


# STARFlow2 components: which run in each model mode (pretzel.model.MODES), and on which tokens
_SEQUENCE_GROUPS = ("deep", "w_vlm", "w_d", "taps")  # on every position of a row (L)
_RUNS = {"nf": ("shallow", "adapter", "deep", "w_vlm", "taps"), "ntp": ("shallow", "adapter"),
         "full": ("shallow", "adapter", "deep", "w_vlm", "w_d", "taps")}


def _starflow2(config, params, trainable, frozen, tokens_per_example) -> ModelFlops:
  """Per row of L = data.max_len positions with I = data.max_images image slots of N latents:
  shallow blocks and adapter on the I N latents, the deep stream and skips on the L positions (6ND
  where they train, 2ND where they only run); the frozen VLM on L (its prefix in stage 1) forward,
  and backward to its inputs (the adapter and shallow blocks train upstream of it in every stage),
  the LM head in the modes with text loss; the FAE trunk and encoder head on the I images' latent
  grid tokens (forward). Attention: the VLM's and the deep stream's over L, the shallow blocks' over
  N, x3 where gradients flow (the FAE's is not counted: about 3% of its forward)."""
  from starflow2_jax.pretzel import config as pconfig, stages
  from starflow2_jax.train.pretzel_task import fae_of
  stage = stages.stage(config.stage)
  fae = fae_of(config)
  qcfg = pconfig.qwen_config(config.vlm)
  m = config.model
  b, length, images = int(config.train.batch_size), int(config.data.max_len), int(config.data.max_images)
  grid = fae.grid[0] * fae.grid[1]
  latents = grid // int(m.latent_patch) ** 2
  runs = _RUNS[stage.mode]
  trained = forward_only = 0.0
  n_train = 0
  for name, sub in params.items():
    group = stages.group_of(name)
    if group not in runs:
      continue
    tokens = b * length if group in _SEQUENCE_GROUPS else b * images * latents
    n_all, n_tr = kernel_params(sub), kernel_params(sub, trainable[name])
    n_train += n_tr
    trained += TRAIN_FACTOR * FORWARD_PER_PARAM_TOKEN * n_tr * tokens
    forward_only += FORWARD_PER_PARAM_TOKEN * (n_all - n_tr) * tokens
  vlm_len = int(m.get("stage1_vlm_prefix", 0)) if stage.mode == "nf" else 0
  vlm_len = vlm_len or length
  head = kernel_params(frozen["vlm"].get("lm_head", {}))
  trunk = kernel_params(frozen["vlm"]) - head
  head_tokens = b * length if stage.mode != "nf" else 0
  fae_n = kernel_params({k: frozen["fae"][k] for k in ("trunk", "head")})
  vlm_fwd = FORWARD_PER_PARAM_TOKEN * (trunk * b * vlm_len + head * head_tokens)
  frozen_fwd = vlm_fwd + FORWARD_PER_PARAM_TOKEN * fae_n * b * images * grid
  width = int(m.width)
  attn = ATTENTION_FORWARD_PER_KEY * b * (
      TRAIN_FACTOR * vlm_len ** 2 * qcfg.num_heads * qcfg.head_dim * qcfg.num_layers
      + (TRAIN_FACTOR * length ** 2 * width * int(m.deep_layers) if "deep" in runs else 0)
      + TRAIN_FACTOR * images * latents ** 2 * width * int(m.shallow_layers) * int(m.shallow_blocks))
  return ModelFlops(trained=trained, frozen=frozen_fwd + forward_only, attention=float(attn),
                    frozen_backward=vlm_fwd, trained_params=n_train,
                    frozen_params=trunk + head + fae_n, tokens=b * length)


def _generic(config, params, trainable, frozen, tokens_per_example) -> ModelFlops:
  tokens = int(config.train.batch_size) * tokens_per_example
  n_train = kernel_params(params, trainable)
  n_frozen = kernel_params(frozen) if frozen is not None else 0
  return ModelFlops(TRAIN_FACTOR * FORWARD_PER_PARAM_TOKEN * n_train * tokens,
                    FORWARD_PER_PARAM_TOKEN * n_frozen * tokens, 0.0, 0.0, n_train, n_frozen, tokens)


# model_kind -> (config, params, trainable, frozen, tokens per example) -> ModelFlops
KINDS: dict[str, Callable[..., ModelFlops]] = {"flow": _flow, "starflow2": _starflow2}


def train_step_flops(config: ml_collections.ConfigDict, params: Any, trainable: Any, frozen: Any,
                     tokens_per_example: int) -> ModelFlops:
  """The analytical FLOPs of one train step of `config` (global batch `config.train.batch_size`).
  params: the (abstract) trainable tree; trainable: bools like it; frozen: the frozen subtree."""
  count = KINDS.get(config.model_kind, _generic)
  return count(config, nn.unbox(params), trainable, frozen, tokens_per_example)
