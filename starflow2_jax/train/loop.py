"""The training loop: config -> mesh -> task -> sharded state -> (restore, or warm start) -> jitted steps
-> checkpoints, logs, samples, held-out evaluation. It knows nothing of images, labels or text: the task
(`train.task.Task`) supplies the record transform, the batch, the loss, the metrics and the samples.

  WORKDIR/checkpoints/   orbax train checkpoints (see train.checkpointing)
  WORKDIR/tensorboard/   TensorBoard event files
  WORKDIR/samples/       sample grids, samples_<step>.png
  WORKDIR/config*.json   the config of each start (never overwritten)
  WORKDIR/eval_<step>.json  held-out metrics at the end of a run
  WORKDIR/params_<step>/ the final parameters (the EMA when there is one; the task's `export_fn` tree
                         when it has one) as a `starflow2_jax.ckpt` parameter checkpoint with its
                         config: `launch.sample --checkpoint=` reads it
"""
from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from starflow2_jax import ckpt, logging_utils, parallel
from starflow2_jax.data import pipeline
from starflow2_jax.errors import UserError
from starflow2_jax.train import checkpointing, mfu, optimizer, state as state_lib, step as step_lib, tasks
from starflow2_jax.scale import hlo_flops, saved as saved_step
from starflow2_jax.train import warm_start
from starflow2_jax.train.task import Task

NONFINITE_MODES = ("skip", "stop")


class NonFiniteError(FloatingPointError):
  pass


def validate(config: ml_collections.ConfigDict) -> None:
  """Fail early, naming the field, on values the loop cannot run."""
  t = config.train
  if t.nonfinite not in NONFINITE_MODES:
    raise UserError(f"train.nonfinite={t.nonfinite!r}: expected one of {NONFINITE_MODES}")
  for name in ("batch_size", "steps", "grad_accum"):
    if int(t[name]) < 1:
      raise UserError(f"train.{name} must be >= 1, found {t[name]}")
  if not 0.0 <= float(t.ema_decay) < 1.0:
    raise UserError(f"train.ema_decay must be in [0, 1), found {t.ema_decay}")
  for name in ("every", "keep"):
    if int(config.checkpoint[name]) < 1:
      raise UserError(f"checkpoint.{name} must be >= 1, found {config.checkpoint[name]}")


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  if jax.process_index() != 0:
    return
  path, n = os.path.join(workdir, "config.json"), 1
  while os.path.exists(path):  # a restart writes config.1.json, config.2.json, ...
    path, n = os.path.join(workdir, f"config.{n}.json"), n + 1
  with open(path, "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def _flops_per_step(compiled) -> float:
  """Matmul FLOPs of one step per device: the compiled HLO with each loop counted as many times as it
  runs (`scale.hlo_flops`; XLA's cost analysis counts a scanned layer stack's body once). Where the
  backend cannot print the optimized HLO back, XLA's cost analysis; 0 when it gives neither."""
  try:
    return hlo_flops.count(compiled.as_text()).flops
  except jax.errors.JaxRuntimeError:  # libtpu's RET_CHECK on some async instructions
    pass
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


def evaluate(task: Task, params, frozen, data: ml_collections.ConfigDict, source,
             mesh: jax.sharding.Mesh, rules, batch_size: int, rng: jax.Array,
             limit: int | None = None) -> dict[str, float]:
  """The task's held-out metrics over `source`, under the train step's mesh and logical rules: a
  per-example metric [b] is averaged over the examples, a (sum [b], count [b]) pair is
  sum(sum) / sum(count); a pair whose count is 0 over the whole split (e.g. a held-out set without any
  flow-loss image) is left out rather than divided by zero. A short last batch is padded (its last row
  repeated) and the padding masked."""
  shards = parallel.batch_shards(mesh) * jax.process_count()
  eval_fn = jax.jit(task.eval_fn)
  sums: dict[str, float] = {}
  counts: dict[str, float] = {}

  def gathered(v: jax.Array, n: int) -> np.ndarray:
    return np.asarray(multihost_utils.process_allgather(v, tiled=True), np.float64)[:n]

  for i, b in enumerate(pipeline.eval_batches(data, source, batch_size, task.record_transform, limit)):
    n = len(jax.tree.leaves(b)[0])
    padded = -(-n // shards) * shards
    b = {k: np.concatenate([v, np.repeat(v[-1:], padded - n, 0)]) for k, v in b.items()}
    local = {k: v[parallel.host_batch_slice(padded)] for k, v in b.items()}
    gb = parallel.make_global_batch(local, mesh, padded)
    gb["pos"] = jnp.arange(padded, dtype=jnp.int32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      out = eval_fn(params, frozen, gb, jax.random.fold_in(rng, i))
    for k, v in out.items():
      s, c = (gathered(v[0], n), gathered(v[1], n)) if isinstance(v, tuple) else (gathered(v, n), None)
      sums[k] = sums.get(k, 0.0) + float(np.sum(s))
      counts[k] = counts.get(k, 0.0) + (float(np.sum(c)) if c is not None else n)
  return {k: sums[k] / counts[k] for k in sums if counts[k] > 0}


def write_samples(task: Task, params, frozen, rng, num: int, path: str, mesh: jax.sharding.Mesh,
                  rules) -> str | None:
  """The task's samples as a PNG grid (process 0; the grid's scale is the image writer's rule)."""
  if task.sample_fn is None or num <= 0:
    return None
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    images = task.sample_fn(params, frozen, rng, num)
  images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
  return logging_utils.write_png_grid(path, images)


def _step_metrics(metrics: dict, sps: float, tokens_per_step: int, flops: float, n_devices: int,
                  peak: tuple[str, float] | None) -> dict[str, float]:
  m = {k: float(v) for k, v in metrics.items()}
  m.update(steps_per_sec=sps, tokens_per_sec=sps * tokens_per_step)
  if flops > 0:  # XLA gave a FLOP count: FLOP/s and MFU (against the chip's or a measured peak)
    m["flops_per_sec"] = sps * flops * n_devices
    if peak is not None:
      m[peak[0]] = sps * flops / peak[1]
  return m


def _initial_state(config, task: Task, tx, init_rng, mesh, rules, state_sh, abstract, ckptr, data_iter):
  """Restore the run's own newest checkpoint; else initialise, warm-started from config.init_from."""
  restored = ckptr.restore_latest(abstract, data_iter)  # onto this config's mesh, whatever saved it
  if restored is not None:
    state, meta = restored
    logging.info("resumed at step %d (saved on mesh %s)%s", int(state.step), meta.get("mesh"),
                 "; config.init_from is ignored on a resume" if config.get("init_from") else "")
    return state
  state, _ = state_lib.init_sharded(task.init_fn, tx, init_rng, mesh, rules, state_sh.ema_params is not None)
  if config.get("init_from"):
    state, _ = warm_start.apply(state, state_sh, tx, config.init_from)
  return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       task: Task | None = None, compiled_step: str | None = None) -> dict[str, Any]:
  """Train `config` in `workdir`, resuming from its latest checkpoint. Returns a summary dict
  (final step, last metrics, held-out metrics, steps/s). `compiled_step`: a train step saved by
  `launch.compile --save` for this config and slice, run instead of compiling one."""
  validate(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  tc = config.train
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.logical_rules(config)
  parallel.check_global_batch(int(tc.batch_size), mesh, int(tc.grad_accum))
  logging.info("mesh %s over %d devices, %d processes", dict(mesh.shape), mesh.size, jax.process_count())
  task = task or tasks.build_task(config, mesh, rules)
  if pipeline.pack_size(config.data) > 1 and not task.packs:
    raise UserError(f"data.pack={config.data.pack}: the {config.model_kind} task's rows hold one record "
                    "each; set data.pack=1")
  train_source = pipeline.build_source(config.data, config.data.train_split)  # fails early on bad data
  data_iter = pipeline.train_iterator(config.data, train_source, int(tc.batch_size), int(tc.seed),
                                      task.record_transform, jax.process_index(), jax.process_count())
  base_rng = jax.random.key(int(tc.seed))
  init_rng, step_rng, sample_rng, eval_rng = (jax.random.fold_in(base_rng, i) for i in range(4))
  tx, labels, trainable = optimizer.for_task(tc, task, init_rng)  # fails on unknown groups early
  _write_config(workdir, config)

  schedule = optimizer.learning_rate_schedule(tc)
  use_ema = float(tc.ema_decay) > 0
  state_sh = state_lib.state_shardings(task.init_fn, tx, init_rng, mesh, rules, use_ema)
  abstract = state_lib.abstract_state(task.init_fn, tx, init_rng, state_sh)
  n_params = sum(x.size for x in jax.tree.leaves(abstract.params))
  n_train = sum(x.size for x, t in zip(jax.tree.leaves(abstract.params), jax.tree.leaves(trainable)) if t)
  logging.info("parameters: %d, of which %d train (groups %s)", n_params, n_train,
               sorted({g for g, t in zip(jax.tree.leaves(labels), jax.tree.leaves(trainable)) if t}))

  ckptr = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  state = _initial_state(config, task, tx, init_rng, mesh, rules, state_sh, abstract, ckptr, data_iter)
  step = int(state.step)

  train_step = step_lib.make_train_step(task.loss_fn, tx, schedule, tc, mesh, rules, state_sh,
                                        task.frozen_shardings, objective=task.objective,
                                        trainable=trainable)
  writer = logging_utils.MetricWriter(os.path.join(workdir, "tensorboard"))
  preempt = _Preemption()
  progress = logging_utils.Progress(int(tc.steps), step)
  global_batch = int(tc.batch_size)
  tokens_per_step = global_batch * task.tokens_per_example
  compiled, flops, peak = None, 0.0, None
  last_metrics: dict[str, float] = {}
  t_window, steps_window, t_train, steps_timed = time.time(), 0, 0.0, 0
  sample_dir = os.path.join(workdir, "samples")
  try:
    while step < int(tc.steps):
      local = {k: v for k, v in next(data_iter).items() if k != pipeline.INDEX_KEY}
      batch = parallel.make_global_batch(local, mesh, global_batch)
      if compiled is None:  # compile once, ahead of time: its HLO gives the FLOPs for MFU
        args = (state, task.frozen, batch, step_rng)
        compiled = (saved_step.load(compiled_step, config, args, mesh) if compiled_step
                    else train_step.lower(*args).compile())
        flops = _flops_per_step(compiled)
        peak = mfu.peak(float(tc.peak_flops)) if flops > 0 else None
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
        metrics = jax.device_get(metrics)  # waits for the step: the window's time is then real
        dt = time.time() - t_window
        if step > int(config.log.every):  # the first window includes compilation
          t_train, steps_timed = t_train + dt, steps_timed + steps_window
        m = _step_metrics(metrics, steps_window / max(dt, 1e-9), tokens_per_step, flops, mesh.size, peak)
        last_metrics = m
        writer.scalars(step, m)
        logging.info("step %d: %s", step, ", ".join(f"{k}={v:.5g}" for k, v in sorted(m.items())))
        progress.update(steps_window, **{"loss": m["loss"], task.headline: m[task.headline]})
        t_window, steps_window = time.time(), 0
      ckptr.save(step, state, data_iter, checkpointing.metadata(step, config, mesh))
      if int(config.log.sample_every) and step % int(config.log.sample_every) == 0:
        write_samples(task, state.params, task.frozen, jax.random.fold_in(sample_rng, step),
                      int(config.log.num_samples), os.path.join(sample_dir, f"samples_{step:07d}.png"),
                      mesh, rules)
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
                             "params": n_params, "trainable_params": n_train}
  final = state.ema_params if state.ema_params is not None else state.params
  export = os.path.join(workdir, f"params_{step:07d}")
  if not int(multihost_utils.broadcast_one_to_all(np.int32(os.path.exists(export)))):
    exported = final if task.export_fn is None else task.export_fn(final, task.frozen)
    summary["export"] = ckpt.save_params(export, {"params": exported}, config, {
        "step": step, "weights": "ema" if state.ema_params is not None else "params",
        "source": "launch.train"})
  if int(config.log.eval_examples) != 0:
    eval_source = pipeline.build_source(config.data, config.data.eval_split)
    limit = None if int(config.log.eval_examples) < 0 else int(config.log.eval_examples)
    summary["eval"] = evaluate(task, final, task.frozen, config.data, eval_source, mesh, rules,
                               global_batch, eval_rng, limit)
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
                                         int(config.log.num_samples), path, mesh, rules)
  return summary
