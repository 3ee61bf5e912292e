"""The sections every training config shares (train, mesh, sharding, checkpoint, log, data, sample).

Experiment files in configs/ start from `base_config()` and override what differs; every field that
exists here can be set on the command line (`--config.train.lr=3e-4`), and a misspelt one fails.
"""
from __future__ import annotations

import ml_collections

from starflow2_jax import parallel
from starflow2_jax.data import pipeline


def train_defaults() -> ml_collections.ConfigDict:
  """STARFLOW2.md 5.6 / 8.1: AdamW (0.9, 0.95), wd 1e-4, warm-up from 1e-6 then cosine to 1e-6."""
  return ml_collections.ConfigDict({
      "batch_size": 256,  # global batch (all processes, all micro-batches)
      "steps": 100_000,
      "lr": 1e-4,
      "init_lr": 1e-6,  # warm-up start
      "warmup": 5_000,
      "min_lr": 1e-6,  # cosine end
      "b1": 0.9,
      "b2": 0.95,
      "eps": 1e-8,
      "weight_decay": 1e-4,
      "clip_norm": 1.0,  # global norm; 0 = no clipping
      "grad_accum": 1,  # micro-batches per step (a lax.scan inside the step)
      "ema_decay": 0.0,  # 0 = no EMA of parameters
      "nonfinite": "skip",  # skip: skip the update and count it | stop: stop with an error
      "seed": 0,
      # per-device peak FLOP/s for MFU; 0: the chip's bf16 peak from train.mfu's table, or (an unknown
      # chip, e.g. a CPU) a matmul peak measured at start-up (logged as mfu_vs_matmul)
      "peak_flops": 0.0,
      "trainable": (),  # parameter groups that train (Task.param_labels); empty: every group
      "group_lr": {},  # {group: multiplier of the learning-rate schedule}; unlisted groups: 1
  })


def sample_defaults() -> ml_collections.ConfigDict:
  """How samples are drawn: training sample grids and `launch.sample` read this one section."""
  return ml_collections.ConfigDict({
      "guidance": 0.0,  # classifier-free guidance weight (0 = none)
      "guidance_rule": "",  # "gaussian" | "linear"; "": the model's own rule (flows.Guidance.for_model)
      "cfg_anneal": False,  # guidance weight ramped over the tokens
      "attn_temp": 1.0,  # attention temperature of the unconditional branch
  })


def base_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "model_kind": "flow",
      "model": {},
      # warm start on a fresh run: another run's WORKDIR, a train checkpoint step directory or an exported
      # parameter checkpoint (train.warm_start); ignored when the run resumes from its own checkpoint
      "init_from": "",
      "data": pipeline.default_data_config(),
      "train": train_defaults(),
      "mesh": parallel.default_mesh_config(),
      "sharding": parallel.default_sharding_config(),
      "checkpoint": {"every": 1000, "keep": 3, "async": True},
      "log": {"every": 50, "sample_every": 0, "num_samples": 64,
              "eval_examples": -1},  # eval_examples: held-out examples at the end (-1 all, 0 none)
      "sample": sample_defaults(),
  })
