"""AdamW with linear warm-up + cosine decay and global-norm clipping (TarFlow/STARFlow defaults).

Schedule: linear from `train.init_lr` to `train.lr` over `train.warmup` steps, then cosine to
`train.min_lr` at `train.steps` (STARFLOW2.md 5.6; apple/ml-tarflow warms up from 1e-6).
"""
from __future__ import annotations

import ml_collections
import optax


def learning_rate_schedule(train: ml_collections.ConfigDict) -> optax.Schedule:
  warmup = max(0, min(int(train.warmup), int(train.steps)))
  return optax.warmup_cosine_decay_schedule(
      init_value=float(train.init_lr), peak_value=float(train.lr), warmup_steps=warmup,
      decay_steps=max(int(train.steps), warmup + 1), end_value=float(train.min_lr))


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """clip_by_global_norm (if train.clip_norm > 0) then AdamW; weight decay on every parameter."""
  parts = []
  if train.clip_norm and train.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(train.clip_norm)))
  parts.append(optax.adamw(learning_rate_schedule(train), b1=float(train.b1), b2=float(train.b2),
                           eps=float(train.eps), weight_decay=float(train.weight_decay)))
  return optax.chain(*parts)
