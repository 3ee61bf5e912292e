"""Train checkpoints: orbax `CheckpointManager` with the train state, the grain iterator state and
JSON metadata (config, step, mesh) in one step directory.

  WORKDIR/checkpoints/<step>/state   the TrainState (sharded arrays; restorable onto any mesh)
  WORKDIR/checkpoints/<step>/data    the grain iterator state, one file per process
  WORKDIR/checkpoints/<step>/meta    {"step", "config", "mesh", "time"}

Saves are asynchronous, every `checkpoint.every` steps, keeping the last `checkpoint.keep`. Only
finalised checkpoints are visible to orbax (an interrupted save stays a temporary directory). On restore
the newest checkpoint that reads back is used; one that fails to read is moved aside to
`<step>.corrupt` (never deleted) with a warning, and the previous one is tried. A checkpoint whose
parameter shapes differ from the current config fails with a message naming every mismatching shape.
"""
from __future__ import annotations

import os
import time
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from starflow2_jax import ckpt
from starflow2_jax.data import pipeline
from starflow2_jax.errors import UserError
from starflow2_jax.train.state import TrainState

CORRUPT_SUFFIX = ".corrupt"


class Checkpointer:
  """Saves and restores (TrainState, data iterator, metadata) under `directory`."""

  def __init__(self, directory: str, checkpoint: ml_collections.ConfigDict):
    self.directory = os.path.abspath(os.path.expanduser(directory))
    self.every = int(checkpoint.every)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(checkpoint.keep),
        enable_async_checkpointing=bool(checkpoint["async"]), create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data", "meta"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_iter, meta: dict, force: bool = False) -> bool:
    """Start a save of `step` if the interval says so (or `force`). Returns whether one started."""
    if (not force and step % self.every) or step in self.manager.all_steps():
      return False  # not due, or already written (never overwritten)
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter),
        meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def _stored_state(self, step: int) -> Any:
    stored = self.manager.item_metadata(step)["state"]
    return getattr(stored, "item_metadata", stored)

  def _move_aside(self, step: int) -> None:
    src = os.path.join(self.directory, str(step))
    if jax.process_index() == 0 and os.path.isdir(src):
      dst, n = src + CORRUPT_SUFFIX, 1
      while os.path.exists(dst):
        dst, n = f"{src}{CORRUPT_SUFFIX}{n}", n + 1
      os.rename(src, dst)
      logging.warning("moved unreadable checkpoint %s to %s", src, dst)
    multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
    self.manager.reload()

  def restore_latest(self, abstract: TrainState, data_iter) -> tuple[TrainState, dict] | None:
    """Restore the newest readable checkpoint onto the shardings in `abstract` (ShapeDtypeStructs with
    shardings: the mesh may differ from the one that saved it). Sets `data_iter`'s state in place.
    Returns (state, meta), or None if there is no checkpoint."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        stored = self._stored_state(step)
      except Exception as e:  # noqa: BLE001 - any failure to read metadata means an unreadable step
        logging.warning("checkpoint %d in %s has unreadable metadata (%s: %s); falling back to the "
                        "previous one", step, self.directory, type(e).__name__, e)
        self._move_aside(step)
        continue
      where = f"checkpoint {self.directory}/{step}"
      ckpt.check_tree_shapes({"params": abstract.params}, {"params": stored["params"]}, what=where)
      n_stored, n_expected = len(jax.tree.leaves(stored)), len(jax.tree.leaves(abstract))
      if n_stored != n_expected:
        raise UserError(f"{where} holds a train state of {n_stored} arrays, the config expects "
                        f"{n_expected}: the optimizer, train.trainable or train.ema_decay differ from "
                        "the run that saved it; use the same settings or a new --workdir")
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        saved_by = int(out["meta"].get("process_count", jax.process_count()))
        if saved_by == jax.process_count():
          self.manager.restore(step, args=ocp.args.Composite(
              data=grain.checkpoint.CheckpointRestore(data_iter)))
        else:  # grain keeps one file per process; the pipeline's position is the step itself
          logging.warning("checkpoint %d was written by %d processes, this run has %d: positioning "
                          "the data iterator at step %d", step, saved_by, jax.process_count(), step)
          data_iter.set_state(pipeline.iterator_state(int(out["meta"]["step"])))
      except Exception as e:  # noqa: BLE001 - partial or corrupt files
        logging.warning("checkpoint %d in %s could not be restored (%s: %s); falling back to the "
                        "previous one", step, self.directory, type(e).__name__, str(e)[:500])
        self._move_aside(step)
        continue
      logging.info("restored checkpoint %d from %s", step, self.directory)
      return out["state"], dict(out["meta"])
    return None


def metadata(step: int, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  return {"step": int(step), "config": config.to_json_best_effort(), "time": time.time(),
          "mesh": {k: int(v) for k, v in mesh.shape.items()}, "process_count": jax.process_count()}
