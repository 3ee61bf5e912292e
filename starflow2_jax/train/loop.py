"""The training loop: config -> mesh -> sharded state -> (restore) -> jitted steps -> checkpoints, logs,
samples, held-out evaluation.

  WORKDIR/checkpoints/   orbax train checkpoints (see train.checkpointing)
  WORKDIR/tensorboard/   TensorBoard event files
  WORKDIR/samples/       sample grids, samples_<step>.png
  WORKDIR/config*.json   the config of each start (never overwritten)
  WORKDIR/eval_<step>.json  held-out metrics at the end of a run
  WORKDIR/params_<step>/ the final parameters (the EMA when there is one) as a `starflow2_jax.ckpt`
                         parameter checkpoint with its config: `launch.sample --checkpoint=` reads it
"""
from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from starflow2_jax import ckpt, logging_utils, parallel
from starflow2_jax.data import pipeline
from starflow2_jax.train import checkpointing, optimizer, state as state_lib, step as step_lib, tasks

NONFINITE_MODES = ("skip", "stop")


class NonFiniteError(FloatingPointError):
  pass


def validate(config: ml_collections.ConfigDict) -> None:
  """Fail early, naming the field, on values the loop cannot run."""
  t = config.train
  if t.nonfinite not in NONFINITE_MODES:
    raise ValueError(f"train.nonfinite={t.nonfinite!r}: expected one of {NONFINITE_MODES}")
  for name in ("batch_size", "steps", "grad_accum"):
    if int(t[name]) < 1:
      raise ValueError(f"train.{name} must be >= 1, found {t[name]}")
  if not 0.0 <= float(t.ema_decay) < 1.0:
    raise ValueError(f"train.ema_decay must be in [0, 1), found {t.ema_decay}")
  for name in ("every", "keep"):
    if int(config.checkpoint[name]) < 1:
      raise ValueError(f"checkpoint.{name} must be >= 1, found {config.checkpoint[name]}")


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() != 0:
    return
  path, n = os.path.join(workdir, "config.json"), 1
  while os.path.exists(path):  # a restart writes config.1.json, config.2.json, ...
    path, n = os.path.join(workdir, f"config.{n}.json"), n + 1
  with open(path, "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def _flops_per_step(compiled) -> float:
  """FLOPs of one step per device, from XLA's cost analysis (0 when the backend gives none)."""
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  return float((ca or {}).get("flops", 0.0))


class _Preemption:
  """SIGTERM sets a flag; the loop saves and exits at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._prev = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    logging.warning("SIGTERM received: saving a final checkpoint and exiting")
    self.requested = True

  def agreed(self) -> bool:
    """True on every process if any process received SIGTERM."""
    if jax.process_count() == 1:
      return self.requested
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))

  def restore(self):
    signal.signal(signal.SIGTERM, self._prev)


def evaluate(task: tasks.Task, params, frozen, source, mesh: jax.sharding.Mesh, batch_size: int,
             rng: jax.Array, limit: int | None = None) -> dict[str, float]:
  """Mean of the task's per-example metrics over the held-out split (padded batches masked out)."""
  shards = parallel.batch_shards(mesh) * jax.process_count()
  eval_fn = jax.jit(task.eval_fn)
  sums: dict[str, float] = {}
  count = 0
  for i, b in enumerate(pipeline.eval_batches(source, batch_size, limit)):
    n = len(b["label"])
    padded = -(-n // shards) * shards
    b = {k: np.concatenate([v, np.repeat(v[-1:], padded - n, 0)]) for k, v in b.items()}
    local = {k: v[parallel.host_batch_slice(padded)] for k, v in b.items()}
    gb = parallel.make_global_batch(local, mesh, padded)
    gb["pos"] = jnp.arange(padded, dtype=jnp.int32)
    with jax.set_mesh(mesh):
      out = eval_fn(params, frozen, gb, jax.random.fold_in(rng, i))
    for k, v in out.items():
      v = np.asarray(multihost_utils.process_allgather(v, tiled=True))[:n]
      sums[k] = sums.get(k, 0.0) + float(np.sum(v, dtype=np.float64))
    count += n
  return {k: v / count for k, v in sums.items()}


def write_samples(task: tasks.Task, params, frozen, rng, num: int, path: str) -> str | None:
  if task.sample_fn is None or num <= 0:
    return None
  labels = (jnp.arange(num, dtype=jnp.int32) % task.num_classes) if task.num_classes else \
      jnp.full((num,), -1, jnp.int32)
  images = task.sample_fn(params, frozen, rng, labels)
  images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
  return logging_utils.write_png_grid(path, images,
                                      upscale=max(1, 128 // images.shape[1]))


def export_params(path: str, variables, config: ml_collections.ConfigDict, metadata: dict) -> str:
  """Write `variables` as a `starflow2_jax.ckpt` parameter checkpoint (config.json, params/, meta.json
  last), from every process: each writes its own shards."""
  if jax.process_index() == 0:
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  multihost_utils.sync_global_devices(f"export_params_{path}")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), variables)
  multihost_utils.sync_global_devices(f"export_params_saved_{path}")
  if jax.process_index() == 0:  # written last: marks a complete checkpoint
    with open(os.path.join(path, "meta.json"), "w") as f:
      json.dump({"format": ckpt.FORMAT, "version": 1, **metadata}, f, indent=2)
  return path


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       task: tasks.Task | None = None) -> dict[str, Any]:
  """Train `config` in `workdir`, resuming from its latest checkpoint. Returns a summary dict
  (final step, last metrics, held-out metrics, steps/s)."""
  validate(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  tc = config.train
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.logical_rules(config)
  parallel.check_global_batch(int(tc.batch_size), mesh, int(tc.grad_accum))
  logging.info("mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size, jax.process_count())
  train_source = pipeline.build_source(config.data, config.data.train_split)  # fails early on bad data
  data_iter = pipeline.train_iterator(config.data, train_source, int(tc.batch_size), int(tc.seed),
                                      jax.process_index(), jax.process_count())
  _write_config(workdir, config)

  task = task or tasks.build_task(config, mesh, rules)
  tx = optimizer.make_optimizer(tc)
  schedule = optimizer.learning_rate_schedule(tc)
  base_rng = jax.random.key(int(tc.seed))
  init_rng, step_rng, sample_rng, eval_rng = (jax.random.fold_in(base_rng, i) for i in range(4))
  use_ema = float(tc.ema_decay) > 0
  state_sh = state_lib.state_shardings(task.init_fn, tx, init_rng, mesh, rules, use_ema)
  abstract = state_lib.abstract_state(task.init_fn, tx, init_rng, state_sh)
  n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  logging.info("trainable parameters: %d", n_params)

  ckptr = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  restored = ckptr.restore_latest(abstract, data_iter)  # onto this config's mesh, whatever saved it
  if restored is not None:
    state, meta = restored
    logging.info("resumed at step %d (saved on mesh %s)", int(state.step), meta.get("mesh"))
  else:
    state, _ = state_lib.init_sharded(task.init_fn, tx, init_rng, mesh, rules, use_ema)
  step = int(state.step)

  train_step = step_lib.make_train_step(task.loss_fn, tx, schedule, tc, mesh, rules, state_sh,
                                        task.frozen_shardings)
  writer = logging_utils.MetricWriter(os.path.join(workdir, "tensorboard"))
  preempt = _Preemption()
  progress = logging_utils.Progress(int(tc.steps), step)
  global_batch = int(tc.batch_size)
  tokens_per_step = global_batch * task.tokens_per_example
  compiled, flops = None, 0.0
  peak = float(tc.peak_flops)
  last_metrics: dict[str, float] = {}
  t_window, steps_window, t_train, steps_timed = time.time(), 0, 0.0, 0
  sample_dir = os.path.join(workdir, "samples")
  try:
    while step < int(tc.steps):
      local = next(data_iter)
      batch = parallel.make_global_batch({"image": local["image"], "label": local["label"]}, mesh,
                                         global_batch)
      if compiled is None:  # compile once, ahead of time: the cost analysis gives FLOPs for MFU
        compiled = train_step.lower(state, task.frozen, batch, step_rng).compile()
        flops = _flops_per_step(compiled)
        t_window = time.time()
      state, metrics = compiled(state, task.frozen, batch, step_rng)
      step += 1
      steps_window += 1
      if tc.nonfinite == "stop" and not int(metrics["finite"]):
        ckptr.wait()
        raise NonFiniteError(
            f"step {step}: the loss or the gradient norm is not finite (loss={float(metrics['loss'])}, "
            f"grad_norm={float(metrics['grad_norm'])}); the update was not applied. The last "
            f"checkpoint is in {ckptr.directory}. Lower train.lr, or set train.nonfinite='skip' to skip "
            "such steps and count them")
      if step % int(config.log.every) == 0 or step == int(tc.steps):
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        dt = time.time() - t_window
        if step > int(config.log.every):  # the first window includes compilation
          t_train, steps_timed = t_train + dt, steps_timed + steps_window
        sps = steps_window / max(dt, 1e-9)
        m.update(steps_per_sec=sps, tokens_per_sec=sps * tokens_per_step,
                 flops_per_sec=sps * flops * mesh.size,
                 mfu=(sps * flops / peak) if peak > 0 else 0.0)
        last_metrics = m
        writer.scalars(step, m)
        logging.info("step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in sorted(m.items())))
        progress.update(steps_window, loss=m["loss"], bpd=m.get("bpd", float("nan")))
        t_window, steps_window = time.time(), 0
      ckptr.save(step, state, data_iter, checkpointing.metadata(step, config, mesh))
      if int(config.log.sample_every) and step % int(config.log.sample_every) == 0:
        write_samples(task, state.params, task.frozen, jax.random.fold_in(sample_rng, step),
                      int(config.log.num_samples), os.path.join(sample_dir, f"samples_{step:07d}.png"))
      if preempt.agreed():
        ckptr.save(step, state, data_iter, checkpointing.metadata(step, config, mesh), force=True)
        ckptr.wait()
        logging.warning("preempted: final checkpoint at step %d written to %s", step, ckptr.directory)
        return {"step": step, "preempted": True, "metrics": last_metrics}
    ckptr.save(step, state, data_iter, checkpointing.metadata(step, config, mesh), force=True)
    ckptr.wait()
  finally:
    preempt.restore()
    progress.close()
    ckptr.close()
    writer.close()

  summary: dict[str, Any] = {"step": step, "preempted": False, "metrics": last_metrics,
                             "steps_per_sec": steps_timed / t_train if t_train > 0 else None,
                             "params": n_params}
  final = state.ema_params if state.ema_params is not None else state.params
  export = os.path.join(workdir, f"params_{step:07d}")
  if not int(multihost_utils.broadcast_one_to_all(np.int32(os.path.exists(export)))):
    summary["export"] = export_params(export, {"params": final}, config, {
        "step": step, "weights": "ema" if state.ema_params is not None else "params",
        "source": "launch.train"})
  if int(config.log.eval_examples) != 0:
    eval_source = pipeline.build_source(config.data, config.data.eval_split)
    limit = None if int(config.log.eval_examples) < 0 else int(config.log.eval_examples)
    summary["eval"] = evaluate(task, final, task.frozen, eval_source, mesh, global_batch,
                               eval_rng, limit)
    logging.info("held-out (%s split) at step %d: %s", config.data.eval_split, step, summary["eval"])
    if jax.process_index() == 0:
      path, n = os.path.join(workdir, f"eval_{step:07d}.json"), 1
      while os.path.exists(path):
        path, n = os.path.join(workdir, f"eval_{step:07d}.{n}.json"), n + 1
      with open(path, "w") as f:
        json.dump(summary, f, indent=2)
  if int(config.log.num_samples) > 0:
    path = os.path.join(sample_dir, f"samples_{step:07d}_final.png")
    if not os.path.exists(path):
      summary["samples"] = write_samples(task, state.params, task.frozen,
                                         jax.random.fold_in(sample_rng, step),
                                         int(config.log.num_samples), path)
  return summary
