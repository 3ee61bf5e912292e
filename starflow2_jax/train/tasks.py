"""What the loop trains: a `Task` bundles a model's init, loss, evaluation and sampling functions.

The loop, the step and checkpointing are generic over tasks; `build_task(config)` picks the task named
by `config.model_kind`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections


@dataclasses.dataclass(frozen=True)
class Task:
  """A trainable model, as functions.

  init_fn(rng) -> trainable params (logically boxed: `nn.with_logical_partitioning` metadata kept).
  loss_fn(params, frozen, batch, rng) -> (loss, metrics): see `train.step`; batch = {"image": uint8
    [b, H, W, C], "label": int32 [b], "pos": int32 [b]}.
  eval_fn(params, frozen, batch, rng) -> {name: float32 [b]} per-example held-out metrics (e.g. bpd).
  sample_fn(params, frozen, rng, labels) -> float32 [n, H, W, C] images in [-1, 1], labels int32 [n]
    (-1 = unconditional); or None: the task has no samples.
  frozen / frozen_shardings: the non-trainable subtree (e.g. a pretrained VLM) and its shardings.
  tokens_per_example: tokens the model processes per example (for tokens/s).
  """
  init_fn: Callable[[jax.Array], Any]
  loss_fn: Callable
  eval_fn: Callable
  sample_fn: Callable | None
  tokens_per_example: int
  num_classes: int = 0
  frozen: Any = None
  frozen_shardings: Any = None


def build_task(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules) -> Task:
  """The task for `config.model_kind`."""
  kind = config.get("model_kind", None)
  if kind == "flow":
    from starflow2_jax.train import flow_task  # train/ may import flows/
    return flow_task.build(config, mesh, rules)
  raise ValueError(f"config.model_kind={kind!r}: expected 'flow'")
