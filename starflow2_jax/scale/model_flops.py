"""Analytical model FLOPs of one train step (the whole global batch, all devices together).

  trained   6 N D: every matmul kernel [in, out] of a trained parameter costs 2 in out per token
            forward and twice that backward (input and weight gradients); N = trained kernel
            parameters (embedding tables, norms and biases are not matmuls), D = tokens per step
  frozen    2 N D for a frozen forward pass (a pretrained VLM / FAE)
  attention per layer and token, 4 T width forward (scores and values over all T keys: the causal
            mask is applied to a dense product, as the compiled kernels do), 3x that with backward

Model kinds register how their tokens and attention are counted (`ATTENTION`); a kind without an
entry is counted by its parameters alone (6ND + 2ND, no attention term).
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
  trained_params: int  # kernel parameters that train
  frozen_params: int  # kernel parameters of the frozen subtree
  tokens: int  # tokens per step

  @property
  def total(self) -> float:
    return self.trained + self.frozen + self.attention


def kernel_params(tree: Any, mask: Any = None) -> int:
  """Elements of the matmul kernels (leaves whose path names a `kernel`) of a (boxed) tree, only the
  leaves where `mask` (bools like the tree) is True."""
  tree = nn.unbox(tree)
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  keep = [True] * len(flat) if mask is None else jax.tree.leaves(mask)
  return sum(x.size for (path, x), k in zip(flat, keep) if k and "kernel" in jax.tree_util.keystr(path))


def _flow_attention(config: ml_collections.ConfigDict, batch: int) -> tuple[int, float]:
  from starflow2_jax.flows import FlowConfig
  cfg = FlowConfig.from_config(config.model)
  t = cfg.num_tokens
  forward = ATTENTION_FORWARD_PER_KEY * batch * t * t * cfg.width * sum(cfg.layers_per_block)
  return batch * t, TRAIN_FACTOR * forward


# model_kind -> (config, global batch) -> (tokens per step, attention FLOPs per step)
ATTENTION: dict[str, Callable[[ml_collections.ConfigDict, int], tuple[int, float]]] = {
    "flow": _flow_attention,
}


def train_step_flops(config: ml_collections.ConfigDict, params: Any, trainable: Any, frozen: Any,
                     tokens_per_example: int) -> ModelFlops:
  """The analytical FLOPs of one train step of `config` (global batch `config.train.batch_size`).
  params: the (abstract) trainable tree; trainable: bools like it; frozen: the frozen subtree."""
  batch = int(config.train.batch_size)
  n_train = kernel_params(params, trainable)
  n_frozen = kernel_params(frozen) if frozen is not None else 0
  if config.model_kind in ATTENTION:
    tokens, attention = ATTENTION[config.model_kind](config, batch)
  else:
    tokens, attention = batch * tokens_per_example, 0.0
  return ModelFlops(trained=TRAIN_FACTOR * FORWARD_PER_PARAM_TOKEN * n_train * tokens,
                    frozen=FORWARD_PER_PARAM_TOKEN * n_frozen * tokens, attention=attention,
                    trained_params=n_train, frozen_params=n_frozen, tokens=tokens)
