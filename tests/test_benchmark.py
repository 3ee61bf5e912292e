"""launch/benchmark.py: `main --quick` runs every part and writes finite, positive figures."""
import json
import math
import os

import numpy as np
import pytest
from absl import app, flags

from launch import benchmark
from starflow2_jax.errors import UserError


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
  # every part but generation (tests/test_export.py times it on its shared tiny STARFlow2)
  parse_flags("--quick", f"--out={out}", "--parts=sampling,jacobi,strategies,flops,decode")
  benchmark.main(["benchmark"])
  printed = capsys.readouterr().out
  assert "uncached / cached" in printed and "sequential / jacobi" in printed
  assert "of the measured peak" in printed and "[table]" in printed
  figures = json.loads(out.read_text())
  s, j, f, st = figures["sampling"], figures["jacobi"], figures["flops"], figures["strategies"]
  assert sorted(f["train_steps"], key=int) == ["32", "64", "96"]  # three model sizes
  headline = [s["cached"]["median_s"], s["uncached"]["median_s"],
              s["uncached_over_cached"]["of_medians"], f["peak"]["flop_per_s"],
              figures["decode"]["2"]["decode_tokens_per_s"], figures["host"]["peak_host_memory_bytes"]]
  for step in f["train_steps"].values():
    headline += [step["xla_flops"], step["analytic_flops"], step["fraction_of_peak"]]
    # the compiled count (the scanned layers' loop x its trip count) and the analytic one agree to
    # within the elementwise work the analytic one omits; XLA's cost analysis counts the body once
    assert 0.8 < step["xla_flops"] / step["analytic_flops"] < 1.5
    assert step["xla_cost_analysis_flops"] < 0.8 * step["xla_flops"]
  for model in ("production_init", "random_heads_std0.05"):
    headline += [j[model]["sequential_over_jacobi"]["of_medians"], j[model]["mean_iters"]]
    assert j[model]["difference"]["rel_rms"] < 0.05  # Jacobi stops near the sequential sample
  for name in ("sequential", "plain_jacobi", "segments", "per_block"):
    headline.append(st[name]["speedup_over_sequential"]["of_medians"])
    assert st[name]["difference"]["rel_rms"] < 0.05
  assert st["sequential"]["difference"]["max_abs"] == 0.0 and st["finite"]
  assert len(st["ranks"]) == len(st["per_block_sequential"]) == 2
  assert all(math.isfinite(x) and x > 0 for x in headline), headline
  assert all(math.isfinite(x) and x >= 0 for x in _numbers(figures))
  assert s["difference"]["max_abs"] < 1e-4  # both samplers invert the same flow


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


def _shared_reference():
  """The copy of apple/ml-tarflow next to the checkout (`../shared/reference/ml-tarflow` of the main
  checkout or of any folder above this one), or $TARFLOW_REFERENCE."""
  if os.environ.get("TARFLOW_REFERENCE"):
    return os.environ["TARFLOW_REFERENCE"]
  here = os.path.dirname(os.path.abspath(__file__))
  for _ in range(4):
    here = os.path.dirname(here)
    path = os.path.join(here, "shared", "reference", "ml-tarflow")
    if os.path.isfile(os.path.join(path, "transformer_flow.py")):
      return path
  pytest.skip("no copy of apple/ml-tarflow found: set TARFLOW_REFERENCE=PATH")


def test_quick_attention_and_reference_parts(tmp_path, parse_flags, capsys):
  out = tmp_path / "bench.json"
  parse_flags("--quick", "--parts=attention,reference", f"--reference_tarflow={_shared_reference()}",
              f"--out={out}")
  benchmark.main(["benchmark"])
  printed = capsys.readouterr().out
  assert "xla / auto" in printed and "reference / ours" in printed
  figures = json.loads(out.read_text())
  assert set(figures) >= {"attention", "reference"} and "sampling" not in figures
  (rows,) = figures["attention"].values()
  assert set(rows) == {"xla", "cpu", "auto"}
  assert all(r["fwd_gflop_per_s"] > 0 and r["fwd_bwd_gflop_per_s"] > 0 for r in rows.values())
  ref = figures["reference"]
  for key in ("train", "sample", "guided"):
    assert ref[key]["ours"]["median_s"] > 0 and ref[key]["reference"]["median_s"] > 0
    assert math.isfinite(ref[key]["reference_over_ours"]["of_medians"])
  # both sides run the same model: the same loss, the same samples (float32 round-off)
  assert math.isfinite(ref["loss"]["ours"])  # a finite flow (its proj_out kernels are not zero)
  np.testing.assert_allclose(ref["loss"]["ours"], ref["loss"]["reference"], rtol=1e-5)
  assert ref["sample_difference"]["sample"]["max_abs"] < 1e-4
  assert ref["sample_difference"]["guided"]["max_abs"] < 1e-4
  assert ref["torch_threads"] >= 1
  # the roofline: analytic FLOPs / the matmul peak bound both steps from below
  roof = ref["roofline"]
  np.testing.assert_allclose(roof["floor_s"], roof["analytic_flops"] / roof["peak_flop_per_s"])
  for side, key in (("ours", "ours_fraction_of_peak"), ("reference", "reference_fraction_of_peak")):
    np.testing.assert_allclose(roof[key], roof["floor_s"] / ref["train"][side]["median_s"])
  np.testing.assert_allclose(roof["target_fraction_of_peak"],
                             roof["target"] * roof["reference_fraction_of_peak"])
  assert "roofline:" in printed


def test_reference_part_needs_a_reference_clone(tmp_path):
  with pytest.raises(UserError, match="needs --reference_tarflow"):
    benchmark.Settings(parts=("reference",))
  s = benchmark.Settings.quick(parts=("reference",), reference_tarflow=str(tmp_path))
  with pytest.raises(UserError, match="no transformer_flow.py there"):
    benchmark.bench_reference(s)
  with pytest.raises(UserError, match="not BxTxHxDh"):
    benchmark.parse_shape("16x256x4")
