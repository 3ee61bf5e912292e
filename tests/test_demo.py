"""The STARFlow2 demo end to end at smoke size (issue 11 item 4): every phase runs, every output exists
and parses, a second run resumes (skips every finished phase) and a demo of another size is refused."""
import json
import os
import sys

import pytest
from PIL import Image

from starflow2_jax.demo import phases, run as demo_run, summary as summary_lib
from starflow2_jax.errors import UserError
from starflow2_jax.eval import shapes_detector

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_smoke_demo_writes_every_output_and_resumes(tmp_path, capsys):
  root = str(tmp_path / "demo")
  result = demo_run.run(root, smoke=True)
  printed = capsys.readouterr().out
  assert "wall time per phase" in printed and "prompt following" in printed and "QA accuracy" in printed

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
    shapes_detector.parse_caption(p["caption"])
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

  again = demo_run.run(root, smoke=True)  # resumes: every phase is done, nothing runs again
  assert again["wall_seconds"] == result["wall_seconds"]
  assert "skipped" in capsys.readouterr().err
  with pytest.raises(UserError, match="holds a demo of size 'smoke'"):
    demo_run.run(root, smoke=False)
