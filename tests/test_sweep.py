"""Scaling studies (issue 12): grid expansion, overrides, FLOP accounting, the frontier and power-law
fit, the written table / JSON / PNG, the per-point commands, and (slow) a 2-point sweep end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from starflow2_jax.errors import UserError
from starflow2_jax.scale import sweep as sweep_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    "base": "tarflow_digits",
    "metric": "bpd",
    "overrides": {"model.layers_per_block": [1, 1], "model.image_size": 8, "data.image_size": 8,
                  "model.patch_size": 2, "train.batch_size": 16, "train.warmup": 0, "log.every": 2,
                  "log.sample_every": 0, "log.num_samples": 0, "log.eval_examples": 32,
                  "checkpoint.every": 100},
    "sizes": {"w8": {"model.width": 8, "model.head_dim": 8}, "w16": {"model.width": 16, "model.head_dim": 8}},
    "budgets": {"s2": {"train.steps": 2}, "s4": {"train.steps": 4}},
}


def test_points_are_the_grid_with_overrides_applied():
  pts = sweep_lib.points(TINY)
  assert [p.name for p in pts] == ["w8-s2", "w8-s4", "w16-s2", "w16-s4"]
  config = sweep_lib.point_config(TINY, pts[3])
  assert (config.model.width, config.train.steps, config.model.image_size) == (16, 4, 8)


def test_unknown_override_fails_naming_it():
  bad = dict(TINY, overrides={"model.widht": 3})
  with pytest.raises(UserError, match="widht"):
    sweep_lib.point_config(bad, sweep_lib.points(bad)[0])


def test_flops_are_steps_times_the_step():
  a, b = sweep_lib.points(TINY)[:2]  # same size, 2 and 4 steps
  for p in (a, b):
    sweep_lib.account(sweep_lib.point_config(TINY, p), p)
  assert b.flops == 2 * a.flops > 0 and a.params == b.params > 0


def test_power_law_fit_recovers_the_exponent():
  c = np.array([1e9, 1e10, 1e11, 1e12])
  a, alpha = sweep_lib.fit_power_law(list(c), list(3.0 * c ** -0.07))
  assert a == pytest.approx(3.0, rel=1e-9) and alpha == pytest.approx(-0.07, rel=1e-9)
  with pytest.raises(UserError, match="positive"):
    sweep_lib.fit_power_law([1.0, 2.0], [1.0, -1.0])


def test_frontier_keeps_only_improving_points():
  pts = [sweep_lib.Point(n, "", "", {}, flops=f, loss=l)
         for n, f, l in [("a", 1, 5.0), ("b", 2, 6.0), ("c", 3, 4.0), ("d", 4, 4.5), ("e", 5, 3.0)]]
  assert [p.name for p in sweep_lib.frontier(pts)] == ["a", "c", "e"]


def test_collect_fits_and_writes_table_json_and_png(tmp_path):
  """Metrics written as a launch.train run does (eval_<step>.json); a point without one is missing."""
  pts = sweep_lib.points(TINY)
  configs = {p.name: sweep_lib.point_config(TINY, p) for p in pts}
  cache = {}
  for p in pts[:3]:
    sweep_lib.account(configs[p.name], p, cache)
    os.makedirs(tmp_path / p.name)
    with open(tmp_path / p.name / "eval_0000004.json", "w") as f:
      json.dump({"eval": {"bpd": 2.0 * p.flops ** -0.05}}, f)
  result = sweep_lib.collect(TINY, str(tmp_path), configs)
  assert result.missing == ["w16-s4"]
  assert result.fit[1] == pytest.approx(-0.05, rel=1e-6)
  md, js, png = result.paths
  assert "FLOPs^-0.0500" in open(md).read() and json.load(open(js))["fit"]["alpha"] == result.fit[1]
  assert Image.open(png).size == sweep_lib.PLOT_SIZE
  again = sweep_lib.collect(TINY, str(tmp_path), configs)  # never overwrites
  assert again.paths[0].endswith("sweep.1.md")


def test_print_mode_commands_are_launch_train_runs(tmp_path):
  cmd = sweep_lib.train_command(TINY, str(tmp_path), sweep_lib.points(TINY)[0])
  assert cmd.startswith("python -m launch.train --config=configs/tarflow_digits.py")
  assert f"--workdir={tmp_path}/w8-s2" in cmd and "'--config.model.layers_per_block=[1,1]'" in cmd


@pytest.mark.slow
def test_sweep_runs_end_to_end(tmp_path):
  """Two points, one already evaluated (skipped: the sweep resumes), the other trained here; then the
  fit over both, the table, JSON and plot."""
  sweep_file = tmp_path / "tiny.py"
  one = dict(TINY, sizes={"w8": TINY["sizes"]["w8"]})
  sweep_file.write_text(f"def get_sweep():\n  return {one!r}\n")
  done = tmp_path / "run" / "w8-s2"
  os.makedirs(done)
  (done / "eval_0000002.json").write_text(json.dumps({"eval": {"bpd": 9.0}}))
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
  out = subprocess.run([sys.executable, "-m", "launch.sweep", f"--sweep={sweep_file}",
                        f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "w8-s2: already evaluated, skipped" in out.stderr
  assert "fitted exponent: bpd ~ FLOPs^" in out.stdout
  assert sorted(os.listdir(tmp_path / "run")) == ["sweep.json", "sweep.md", "sweep.png", "w8-s2", "w8-s4"]
  points = json.load(open(tmp_path / "run" / "sweep.json"))["points"]
  assert [p["name"] for p in points if p["loss"] is not None] == ["w8-s2", "w8-s4"], points
