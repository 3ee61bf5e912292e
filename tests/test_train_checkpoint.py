"""Checkpointing: resume after SIGKILL is bit-identical (46), SIGTERM writes a final checkpoint, a corrupt
newest checkpoint is skipped with a warning, an incompatible config names the mismatching shapes, and a
checkpoint restores onto a different mesh."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from starflow2_jax import ckpt, parallel
from starflow2_jax.data import pipeline
from starflow2_jax.train import checkpointing, flow_task, state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "tests", "train_runner.py")
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Subprocess environment: 4 fake CPU devices, a shared persistent compilation cache (the runs of one
  test compile the same programs), and XLA's fast-compile backend level."""
  e = dict(os.environ)
  e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
  e["JAX_PLATFORMS"] = "cpu"
  e["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
  e["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  e["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
  return e


def _launch(env, workdir, overrides, *args):
  return subprocess.Popen([sys.executable, RUNNER, str(workdir), json.dumps(overrides), *map(str, args)],
                          env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, expect_rc=0):
  out, _ = proc.communicate(timeout=TIMEOUT_S)
  assert proc.returncode == expect_rc, out[-5000:]
  return out


def _wait_for(paths, proc):
  deadline = time.time() + TIMEOUT_S
  while not all(os.path.exists(p) for p in paths):
    if proc.poll() is not None:
      raise AssertionError(f"process ended early:\n{proc.stdout.read()[-5000:]}")
    assert time.time() < deadline, f"timed out waiting for {paths}"
    time.sleep(0.05)


def _state_arrays(workdir, step):
  with ocp.StandardCheckpointer() as c:
    tree = c.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return jax.tree.map(np.asarray, tree)


def _digests(path):
  with open(path) as f:
    return [json.loads(line)["digest"] for line in f]


def test_resume_after_sigkill_is_bit_identical(tmp_path, env):
  """12 steps, checkpoints every 4; run B is SIGKILLed during step 10 (after checkpoint 8 is final)
  and restarted: parameters, optimizer state, data order, iterator state and metrics match run A."""
  a, b = tmp_path / "a", tmp_path / "b"
  _finish(_launch(env, a, {}, "--log", tmp_path / "a.jsonl"))
  proc = _launch(env, b, {}, "--log", tmp_path / "b.jsonl", "--pause_at", 10)
  _wait_for([b / "paused", b / "checkpoints" / "8"], proc)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=TIMEOUT_S)
  assert {"4", "8"} <= set(os.listdir(b / "checkpoints"))
  assert not (b / "checkpoints" / "12").exists()
  _finish(_launch(env, b, {}, "--log", tmp_path / "b.jsonl"))

  sa, sb = _state_arrays(a, 12), _state_arrays(b, 12)
  assert jax.tree.structure(sa) == jax.tree.structure(sb)
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    assert np.array_equal(x, y)
  assert int(sb["step"]) == 12
  da, db = _digests(tmp_path / "a.jsonl"), _digests(tmp_path / "b.jsonl")
  assert len(da) == 12 and db == da[:9] + da[8:]  # B fed steps 1-9, then 9-12 after the restart
  names = [n for n in os.listdir(a / "checkpoints" / "12" / "data") if n.startswith("process_")]
  assert names
  for name in names:  # the grain iterator state
    assert (a / "checkpoints" / "12" / "data" / name).read_text() == \
        (b / "checkpoints" / "12" / "data" / name).read_text()
  ma = json.loads((a / "summary.json").read_text())["metrics"]
  mb = json.loads((b / "summary.json").read_text())["metrics"]
  assert ma["loss"] == mb["loss"] and ma["grad_norm"] == mb["grad_norm"]
  # on a CPU (no chip peak known) MFU is against the matmul peak measured at start-up, never a 0
  assert "mfu" not in ma and 0 < ma["mfu_vs_matmul"] < 1 and ma["flops_per_sec"] > 0
  # the final parameters are exported as a parameter checkpoint that carries the config (launch.sample)
  assert ckpt.load_config(str(a / "params_0000012")).model.width == 32
  exported = ckpt.load_params(str(a / "params_0000012"))
  for x, y in zip(jax.tree.leaves(exported["params"]), jax.tree.leaves(sa["params"])):
    assert np.array_equal(np.asarray(x), y)


def test_sigterm_writes_final_checkpoint_and_exits_cleanly(tmp_path, env):
  w = tmp_path / "w"
  resume = tmp_path / "resume"
  proc = _launch(env, w, {}, "--pause_at", 6, "--resume_file", resume)
  _wait_for([w / "paused"], proc)
  proc.send_signal(signal.SIGTERM)
  resume.write_text("go")
  _finish(proc, expect_rc=0)
  assert sorted(os.listdir(w / "checkpoints")) == ["4", "6"]
  assert json.loads((w / "summary.json").read_text())["preempted"] is True
  assert int(_state_arrays(w, 6)["step"]) == 6


# In-process checkpoint mechanics on a small TrainState (no model compile needed) -------------------

def _ckpt_config(every=1, keep=5):
  return ml_collections.ConfigDict({"every": every, "keep": keep, "async": True})


def _small_state(mesh, width=8, seed=0):
  params = {"dense": {"kernel": jnp.asarray(np.random.default_rng(seed).normal(size=(8, width)),
                                            jnp.float32)}}
  tx = optax.adamw(1e-3)
  state = state_lib.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                               ema_params=None, skipped=jnp.int32(0))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp"))
  rep = parallel.replicated(mesh)
  sh = jax.tree.map(lambda x: spec if x.ndim == 2 else rep, state)
  return jax.device_put(state, sh), sh


def _abstract(sh, state):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, sh)


def _data_iter():
  cfg = pipeline.default_data_config()
  cfg.image_size = 8
  return pipeline.train_iterator(cfg, pipeline.build_source(cfg, "train"), 8, 0, flow_task.ImageLabel())


def _save_steps(directory, mesh, steps, process_count=1):
  ck = checkpointing.Checkpointer(directory, _ckpt_config())
  it = _data_iter()
  states = {}
  for s in steps:
    st, sh = _small_state(mesh, seed=s)
    st = st.replace(step=jnp.int32(s))
    next(it)
    assert ck.save(s, st, it, {"step": s, "process_count": process_count})
    states[s] = st
  ck.close()
  return states, sh


def test_corrupt_newest_checkpoint_falls_back_with_warning(tmp_path, caplog):
  mesh = parallel.make_mesh({"shape": {"fsdp": 8}})
  states, sh = _save_steps(tmp_path, mesh, [1, 2])
  for root, _, files in os.walk(tmp_path / "2" / "state"):  # truncate every array file of step 2
    for f in files:
      if not f.startswith("_"):
        open(os.path.join(root, f), "wb").close()
  (tmp_path / "3.orbax-checkpoint-tmp-1234").mkdir()  # an interrupted save: invisible to orbax
  ck = checkpointing.Checkpointer(tmp_path, _ckpt_config())
  it = _data_iter()
  abstract = _abstract(sh, states[1])
  with caplog.at_level(logging.WARNING):
    state, meta = ck.restore_latest(abstract, it)
  ck.close()
  assert meta["step"] == 1 and int(state.step) == 1
  assert np.array_equal(np.asarray(state.params["dense"]["kernel"]),
                        np.asarray(states[1].params["dense"]["kernel"]))
  assert any("checkpoint 2" in r.getMessage() and "falling back" in r.getMessage()
             for r in caplog.records)
  assert (tmp_path / "2.corrupt").is_dir() and not (tmp_path / "2").exists()  # moved, not deleted
  assert it.get_state() == {"next_index": 1}


def test_incompatible_config_names_mismatching_shapes(tmp_path):
  mesh = parallel.make_mesh({"shape": {"fsdp": 8}})
  _save_steps(tmp_path, mesh, [1])
  other, sh = _small_state(mesh, width=16)
  ck = checkpointing.Checkpointer(tmp_path, _ckpt_config())
  with pytest.raises(ValueError, match=r"\['dense'\]\['kernel'\]: expected \(8, 16\), found \(8, 8\)"):
    ck.restore_latest(_abstract(sh, other), _data_iter())
  same, sh = _small_state(mesh)
  with_ema = same.replace(ema_params=same.params)
  with pytest.raises(ValueError, match="train.ema_decay"):
    ck.restore_latest(_abstract(sh.replace(ema_params=sh.params), with_ema), _data_iter())
  ck.close()
  assert os.listdir(tmp_path) == ["1"]  # nothing moved aside: an incompatible config is not corruption


def test_restore_onto_a_different_mesh_and_process_count(tmp_path, caplog):
  # written "by 2 processes": grain's per-process iterator files do not apply; the position is the step
  states, _ = _save_steps(tmp_path, parallel.make_mesh({"shape": {"fsdp": 8}}), [1, 2, 3],
                          process_count=2)
  mesh2 = parallel.make_mesh({"shape": {"data": 2, "fsdp": 2, "tensor": 2}})
  target, sh2 = _small_state(mesh2)
  ck = checkpointing.Checkpointer(tmp_path, _ckpt_config())
  it = _data_iter()
  with caplog.at_level(logging.WARNING):
    state, _ = ck.restore_latest(_abstract(sh2, target), it)
  ck.close()
  assert it.get_state() == pipeline.iterator_state(3)
  assert any("written by 2 processes" in r.getMessage() for r in caplog.records)
  k = state.params["dense"]["kernel"]
  assert k.sharding == sh2.params["dense"]["kernel"]
  assert np.array_equal(np.asarray(k), np.asarray(states[3].params["dense"]["kernel"]))
