"""AdamW with linear warm-up + cosine decay and global-norm clipping (TarFlow/STARFlow defaults), as an
optax partition over the task's parameter groups (training stages).

Schedule: linear from `train.init_lr` to `train.lr` over `train.warmup` steps, then cosine to
`train.min_lr` at `train.steps` (STARFLOW2.md 5.6; apple/ml-tarflow warms up from 1e-6).

Groups. `Task.param_labels(params)` names each parameter's group. `train.trainable` lists the groups
that train (empty: every group); the others get `optax.set_to_zero()`: no update, no optimizer state,
no weight decay, and the step computes no gradient for them. `train.group_lr` {group: multiplier}
scales a trainable group's whole schedule (warm-up, peak and end) by the multiplier (default 1).
Clipping (`train.clip_norm`) is over the global norm of the gradients (zero for frozen groups).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax

from starflow2_jax.errors import UserError

FROZEN = "__frozen__"  # the partition label of every group that does not train


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  warmup = max(0, min(int(train.warmup), int(train.steps)))
  return optax.warmup_cosine_decay_schedule(
      init_value=float(train.init_lr), peak_value=float(train.lr), warmup_steps=warmup,
      decay_steps=max(int(train.steps), warmup + 1), end_value=float(train.min_lr))


def _trainable_groups(train: ml_collections.ConfigDict, groups: list[str]) -> list[str]:
  asked = list(train.get("trainable", ()) or ())
  group_lr = dict(train.get("group_lr", {}) or {})
  unknown = sorted((set(asked) | set(group_lr)) - set(groups))
  if unknown:
    raise UserError(f"train.trainable={asked} / train.group_lr={group_lr}: unknown parameter groups "
                    f"{unknown}; this task's groups are {groups}")
  frozen_lr = sorted(set(group_lr) - set(asked)) if asked else []
  if frozen_lr:
    raise UserError(f"train.group_lr sets {frozen_lr}, which train.trainable={asked} does not train; "
                    "add them to train.trainable or remove them from train.group_lr")
  return asked or groups


def trainable_mask(labels: Any, train: ml_collections.ConfigDict) -> Any:
  """Bools like `labels`: True where the parameter's group trains."""
  groups = sorted(set(jax.tree.leaves(labels)))
  train_groups = set(_trainable_groups(train, groups))
  return jax.tree.map(lambda g: g in train_groups, labels)


def make_optimizer(train: ml_collections.ConfigDict, labels: Any) -> optax.GradientTransformation:
  """labels: the task's group name per parameter (`Task.param_labels(params)`, a tree like the params).

  chain(clip_by_global_norm (if train.clip_norm > 0), partition(AdamW per trainable group, set_to_zero
  for the frozen ones)). Weight decay applies to every trainable parameter. The clipping norm counts the
  frozen groups' gradients, which the step leaves at zero (`make_train_step(trainable=trainable_mask)`).
  """
  groups = sorted(set(jax.tree.leaves(labels)))
  train_groups = _trainable_groups(train, groups)
  group_lr = dict(train.get("group_lr", {}) or {})
  part_labels = jax.tree.map(lambda g: g if g in train_groups else FROZEN, labels)
  schedule = learning_rate_schedule(train)

  def adamw(mult: float) -> optax.GradientTransformation:
    lr = schedule if mult == 1.0 else (lambda count: mult * schedule(count))
    return optax.adamw(lr, b1=float(train.b1), b2=float(train.b2), eps=float(train.eps),
                       weight_decay=float(train.weight_decay))

  updates = {g: adamw(float(group_lr.get(g, 1.0))) for g in train_groups}
  if len(train_groups) < len(groups):
    updates[FROZEN] = optax.set_to_zero()
  parts = []
  if train.clip_norm and train.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(train.clip_norm)))
  parts.append(optax.partition(updates, part_labels))
  return optax.chain(*parts)


def for_task(train: ml_collections.ConfigDict, task, rng: jax.Array):
  """-> (tx, labels, trainable) for a `train.task.Task`: its group labels (from the abstract init),
  `make_optimizer` over them and `trainable_mask`; what the loop and the benchmark build alike."""
  labels = task.param_labels(nn.unbox(jax.eval_shape(task.init_fn, rng)))
  return make_optimizer(train, labels), labels, trainable_mask(labels, train)
