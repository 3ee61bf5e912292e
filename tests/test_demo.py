"""The STARFlow2 demo end to end at smoke size (issue 11 item 4): `python -m launch.demo --smoke` runs every
phase, every output exists and parses, a second run resumes (skips every finished phase) and a demo of
another size is refused.

The demo runs as the user runs it: the CLI in a subprocess on one CPU device (the tests' 8 fake devices
would turn every phase's programs into 8-way SPMD ones and make the smoke demo about twice as slow); the
resume and the refusal run in this process (nothing is trained again)."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from starflow2_jax.demo import evaluate, phases, run as demo_run, summary as summary_lib
from starflow2_jax.errors import UserError
from starflow2_jax.eval import shapes_detector

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
FAKE_DEVICES = "--xla_force_host_platform_device_count"
TIMEOUT_S = 900  # far above the demo's smoke time: a hung phase fails the test instead of blocking CI


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _one_device_env():
  """This process's environment with the fake-device flag dropped from XLA_FLAGS (the rest kept)."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(FAKE_DEVICES)]
  env["XLA_FLAGS"] = " ".join(flags)
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


@pytest.mark.slow
def test_smoke_demo_writes_every_output_and_resumes(tmp_path, capsys):
  root = str(tmp_path / "demo")
  done = subprocess.run([sys.executable, "-m", "launch.demo", f"--workdir={root}", "--smoke"], cwd=REPO,
                        env=_one_device_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
  assert done.returncode == 0, done.stderr[-4000:]
  assert "wall time per phase" in done.stdout and "prompt following" in done.stdout
  assert "QA accuracy" in done.stdout
  for k, name in enumerate(phases.PHASES, 1):  # each phase announced in order, training ones by command
    assert f"[{k}/{len(phases.PHASES)}] {name}:" in done.stderr
  assert "python -m launch.train --config=configs/starflow2_shapesworld.py:stage=3,smoke" in done.stderr

  with open(os.path.join(root, summary_lib.SUMMARY_FILE)) as f:
    summary = json.load(f)
  assert summary["size"] == "smoke" and set(summary["wall_seconds"]) == set(phases.PHASES)
  assert summary["total_seconds"] > 0 and summary["fae_psnr"] > 0 and summary["lm"]["perplexity"] > 1
  assert isinstance(summary["latent_nll"], float)
  for group in summary_lib.GROUPS:
    assert set(shapes_detector.ATTRIBUTES) <= set(summary["prompt_following"][group])

  t2i = os.path.join(root, "eval", "t2i")
  prompts = _jsonl(os.path.join(t2i, "prompts.jsonl"))
  flags = [p["excluded_combination"] for p in prompts]
  assert any(flags) and not all(flags)
  for p in prompts:
    assert set(p) == {"file", "caption", "excluded_combination"}
    parsed = shapes_detector.parse_caption(p["caption"])
    assert all(o["cell"] is not None for o in parsed["objects"])  # the demo's grid layout names cells
    with Image.open(os.path.join(t2i, p["file"])) as im:
      assert im.size == (32, 32) and im.mode == "RGB"
  qa = _jsonl(os.path.join(root, "eval", "qa.jsonl"))
  assert qa and all({"question", "answer", "prediction"} <= set(r) for r in qa)
  assert all(isinstance(r["prediction"], str) for r in qa)
  with open(os.path.join(root, "eval", "interleaved", "index.html")) as f:
    page = f.read()
  # one section per document (a smoke-size model rarely opens an image span by itself)
  assert page.startswith("<!DOCTYPE html>") and page.endswith("</html>")
  assert page.count("<section>") == demo_run.EVAL_SIZES["smoke"][2]

  for name in phases.PHASES[1:6]:  # every training phase is an ordinary launch.train run
    assert os.path.isfile(os.path.join(root, name, "config.json"))
    with open(os.path.join(root, name, "config.json")) as f:  # all on the scenes of one layout
      assert json.load(f)["data"]["shapes_layout"] == "grid"

  again = demo_run.run(root, smoke=True)  # resumes: every phase is done, nothing runs again
  assert again["wall_seconds"] == summary["wall_seconds"]
  assert again["prompt_following"] == summary["prompt_following"] and again["qa"] == summary["qa"]
  err = capsys.readouterr().err
  assert all(f"{name}: done (" in err and "), skipped" in err for name in phases.PHASES)
  with pytest.raises(UserError, match="holds a demo of size 'smoke'"):
    demo_run.run(root, smoke=False)


def test_held_out_captions_name_cells_and_cover_every_excluded_combination():
  from configs import starflow2_shapesworld
  data = starflow2_shapesworld.get_config("stage=3").data
  rows = evaluate.heldout_captions(data, 10)
  assert len(rows) == 10 + len(starflow2_shapesworld.EXCLUDED) * 2 * len(evaluate.EXCLUDED_CELLS)
  for row in rows:
    objects = shapes_detector.parse_caption(row["caption"])["objects"]
    assert all(o["cell"] for o in objects)
    assert row["excluded_combination"] == any(
        (o["colour"], o["kind"]) in starflow2_shapesworld.EXCLUDED for o in objects)
  tail = [shapes_detector.parse_caption(r["caption"])["objects"][0] for r in rows[10:]]
  assert {(o["colour"], o["kind"], o["size"], o["cell"]) for o in tail} == {
      (c, k, z, cell) for c, k in starflow2_shapesworld.EXCLUDED for z in ("small", "large")
      for cell in evaluate.EXCLUDED_CELLS}


def test_a_phase_stopped_by_a_signal_is_not_done_and_resumes(tmp_path, monkeypatch, capsys):
  """SIGTERM during a training phase: `launch.train` writes its checkpoint and returns preempted; the
  demo stops there without marking the phase done, and running it again runs that phase again (the loop
  resumes it from its checkpoint) instead of skipping it."""
  from starflow2_jax.train import loop
  calls = []

  def stopped(config, workdir):
    calls.append(workdir)
    return {"step": 2, "preempted": True, "metrics": {}}
  monkeypatch.setattr(loop, "train_and_evaluate", stopped)
  root = str(tmp_path / "demo")
  assert demo_run.run(root, smoke=True) is None
  lm = os.path.join(root, "lm")
  assert calls == [lm]
  assert "[2/7] lm: stopped by a signal at step 2" in capsys.readouterr().err
  state = phases.State(root, "smoke")
  assert state.done("tokenizer") and not state.done("lm") and state.seconds("lm") > 0
  assert demo_run.run(root, smoke=True) is None
  assert calls == [lm, lm]  # run again, not skipped
