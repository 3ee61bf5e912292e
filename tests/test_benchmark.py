"""launch/benchmark.py: `main --quick` runs every part and writes finite, positive figures."""
import json
import math

import pytest
from absl import app, flags

from launch import benchmark


@pytest.fixture
def parse_flags():
  """Parse benchmark flags for one in-process `main` call; restore the unparsed state afterwards."""
  def parse(*args):
    flags.FLAGS(["benchmark", *args])
  yield parse
  flags.FLAGS.unparse_flags()


def _numbers(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _numbers(v)
  elif isinstance(tree, (list, tuple)):
    for v in tree:
      yield from _numbers(v)
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield tree


def test_quick_run_writes_finite_positive_figures(tmp_path, parse_flags, capsys):
  out = tmp_path / "bench.json"
  parse_flags("--quick", f"--out={out}")
  benchmark.main(["benchmark"])
  printed = capsys.readouterr().out
  assert "uncached / cached" in printed and "sequential / jacobi" in printed
  assert "of the measured peak" in printed
  figures = json.loads(out.read_text())
  s, j, f = figures["sampling"], figures["jacobi"], figures["flops"]
  headline = [s["cached"]["median_s"], s["uncached"]["median_s"],
              s["uncached_over_cached"]["of_medians"],
              f["peak"]["flop_per_s"], f["train_step"]["xla_flops"],
              f["train_step"]["analytic_flops"], f["train_step"]["fraction_of_peak"]]
  for model in ("production_init", "random_heads_std0.05"):
    headline += [j[model]["sequential_over_jacobi"]["of_medians"], j[model]["mean_iters"]]
    assert j[model]["difference"]["rel_rms"] < 0.05  # Jacobi stops near the sequential sample
  assert all(math.isfinite(x) and x > 0 for x in headline), headline
  assert all(math.isfinite(x) and x >= 0 for x in _numbers(figures))
  assert s["difference"]["max_abs"] < 1e-4  # both samplers invert the same flow
  # XLA's count and the analytic one agree to within the elementwise work the analytic one omits
  assert 0.8 < f["train_step"]["xla_flops"] / f["train_step"]["analytic_flops"] < 1.5


def test_refuses_to_overwrite(tmp_path, parse_flags):
  out = tmp_path / "bench.json"
  out.write_text("{}")
  parse_flags("--quick", f"--out={out}")
  with pytest.raises(app.UsageError, match="refusing to overwrite"):
    benchmark.main(["benchmark"])
  assert out.read_text() == "{}"


def test_rejects_bad_settings():
  with pytest.raises(ValueError, match="perfect square"):
    benchmark.Settings(tokens=200)
  with pytest.raises(ValueError, match="unknown part"):
    benchmark.Settings(parts=("sampling", "vlm"))
