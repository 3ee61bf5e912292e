"""Two processes x 4 CPU devices (jax.distributed on 127.0.0.1, gloo) train like one process with 8
devices: the loss, grad_norm and every array of the train state (parameters and the AdamW moments, which
are running sums of the gradients) leaf by leaf; the orbax checkpoint round-trips across processes bit
for bit (50)."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from starflow2_jax import ckpt
from starflow2_jax.train import loop
from train_runner import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(REPO, "tests", "train_runner.py")
TIMEOUT_S = 400
OVERRIDES = {"train.steps": 3, "checkpoint.every": 3, "log.eval_examples": 0}
EVAL = {"log.eval_examples": 32}


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, overrides, cache_dir):
  env = dict(os.environ)
  # XLA's fast-compile backend level and a compilation cache shared by the two launches
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
  env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, RUNNER, str(workdir), json.dumps(overrides), "--coordinator", f"127.0.0.1:{port}",
       "--num_processes", "2", "--process_id", str(i)], env=env, cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-5000:]
  return json.loads((workdir / "summary.json").read_text())


def _state(workdir, step):
  """The saved train state, restored onto this process's first device (whatever mesh saved it)."""
  return ckpt.read_tree(os.path.join(workdir, "checkpoints", str(step), "state"))


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  two = _two_processes(tmp_path / "two", OVERRIDES, tmp_path / "cache")
  one = loop.train_and_evaluate(tiny_config(**{**OVERRIDES, **EVAL}), str(tmp_path / "one"))
  assert two["step"] == one["step"] == 3
  for name in ("loss", "grad_norm", "bpd"):
    lo, lt = one["metrics"][name], two["metrics"][name]
    assert abs(lo - lt) <= 1e-5 * max(1, abs(lo)), name
  s1, s2 = _state(tmp_path / "one", 3), _state(tmp_path / "two", 3)
  assert jax.tree.structure(s1) == jax.tree.structure(s2)
  # An AdamW step moves a parameter by about lr whatever the size of its gradient, so a parameter whose
  # gradient is a near-cancelling sum (reduced in another order over 2 x 4 devices) may move by another
  # small fraction of lr: parameters are compared on the scale of max(|leaf|, lr x steps).
  config = tiny_config(**OVERRIDES)
  moved = config.train.lr * config.train.steps
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(s1)[0], jax.tree.leaves(s2)):
    name = jax.tree_util.keystr(path)
    scale = np.max(np.abs(a), initial=0)
    if name.startswith("['params']"):
      scale = max(scale, moved)
    assert np.max(np.abs(a - b), initial=0) <= 1e-5 * scale, name
  # the exported parameters and the checkpoint, both written by the two processes, agree bit for bit
  exported = ckpt.read_tree(os.path.join(tmp_path / "two", "params_0000003", "params"))["params"]
  for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(s2["params"])):
    assert np.array_equal(a, b)
  # restart both processes: they restore checkpoint 3 (written by two processes), train nothing more,
  # and evaluate the restored parameters like the one-process run does
  again = _two_processes(tmp_path / "two", {**OVERRIDES, **EVAL}, tmp_path / "cache")
  assert again["step"] == 3
  assert abs(one["eval"]["bpd"] - again["eval"]["bpd"]) <= 1e-5 * one["eval"]["bpd"]
