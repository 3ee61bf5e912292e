"""What the loop trains: a `Task` bundles a model's data transform, init, loss, evaluation, samples and
parameter groups, as functions. The loop, the step and checkpointing know nothing of images, labels or
text: everything model-specific is here (a new model is a new `train/<kind>_task.py`, registered in
`train.tasks`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax


@dataclasses.dataclass(frozen=True)
class Task:
  """A trainable model, as functions. b = examples in the (micro-)batch.

  record_transform(record: dict) -> dict of numpy arrays: one example as the task's batch holds it
    (e.g. {"image": uint8 [H, W, C], "label": int32 []}). It receives every field of a dataset record
    (image, label, caption, questions, answers: whatever the source has) after the pipeline's
    augmentation, runs in grain (possibly in worker processes), so it must be picklable (a module-level
    class instance, not a closure), and must return the same keys and shapes for every record.
  init_fn(rng) -> trainable params (logically boxed: `nn.with_logical_partitioning` metadata kept).
  loss_fn(params, frozen, batch, rng) -> {term: (sum, count)} float32 scalars: see `train.step`. batch =
    the stacked `record_transform` outputs [b, ...] plus "pos" int32 [b] (positions in the global batch).
  objective: {term: weight}: the loss the optimizer minimises is sum_t weight_t * sum_t / count_t, each
    term's sum and count taken over the global batch (every term of `loss_fn` is also logged).
  eval_fn(params, frozen, batch, rng) -> {name: float32 [b] | (sum float32 [b], count float32 [b])}:
    held-out metrics per example; the loop reports mean(value) or sum(sum) / sum(count) over the split
    (padded rows are masked by the loop).
  sample_fn(params, frozen, rng, num) -> float32 [num, H, W, C] images in [-1, 1] (the task decides
    labels, prompts, guidance); or None: the task has no samples.
  param_labels(params) -> a tree of the same structure as the (unboxed) params with a group name (str)
    per leaf: `train.trainable` and `train.group_lr` name these groups.
  headline: the train metric shown in the progress bar next to the loss (a key of `loss_fn`'s terms).
  tokens_per_example: tokens the model processes per example (for tokens/s).
  frozen / frozen_shardings: the non-trainable subtree (e.g. a pretrained VLM) and its shardings.
  export_fn(params, frozen) -> the parameter tree the run exports (e.g. with the frozen parts and
    statistics over the training data); None: the trained params as they are.
  packs: record_transform fills one row from a packed record {"records": [...]} (data.pack > 1,
    `data.pipeline.Packed`); the loop refuses data.pack > 1 for a task without it.
  """
  record_transform: Callable[[dict], dict]
  init_fn: Callable[[jax.Array], Any]
  loss_fn: Callable
  objective: Mapping[str, float]
  eval_fn: Callable
  sample_fn: Callable | None
  param_labels: Callable[[Any], Any]
  headline: str
  tokens_per_example: int
  frozen: Any = None
  frozen_shardings: Any = None
  export_fn: Callable | None = None
  packs: bool = False
