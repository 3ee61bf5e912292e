"""`python -m launch.sample` for STARFlow2 checkpoints (issue 10): text-to-image, understanding and
interleaved documents to PNGs, generation.json and a self-contained index.html; bad input."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from starflow2_jax import ckpt
from starflow2_jax.errors import UserError
from starflow2_jax.generate import api, cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import starflow2_tiny  # noqa: E402


def _config():
  config = starflow2_tiny.get_config("stage=3")
  config.data.max_len = 64
  return config


def _fake_checkpoint(path, config):
  """A directory with only config.json: enough for every check made before the model is loaded."""
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    f.write(config.to_json())
  return str(path)


def test_existing_output_dir_is_never_overwritten(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "mine.txt").write_text("keep")
  with pytest.raises(UserError, match="exists; choose a new directory"):
    cli.sample_to_dir(_fake_checkpoint(tmp_path / "ck", _config()), str(out), kind="text_to_image",
                      prompt="a red circle")
  assert os.listdir(out) == ["mine.txt"]


def test_wrong_image_size(tmp_path):
  path = tmp_path / "big.png"
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(path)
  with pytest.raises(UserError, match="resize it to 32x32"):
    cli.read_image(str(path), 32)


def test_guidance_without_null_prompt():
  config = _config()
  config.data.caption_dropout = 0.0
  s = api.sample_settings(config)
  assert api.guidance_for(config, s).weight == 0  # the default: no guidance
  with pytest.raises(UserError, match="data.caption_dropout=0.0"):
    api.guidance_for(config, dict(s, guidance=2.0))


def test_flags_of_another_kind_are_an_error(tmp_path):
  ck = _fake_checkpoint(tmp_path / "ck", _config())
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  r = subprocess.run([sys.executable, "-m", "launch.sample", f"--checkpoint={ck}", "--labels=1",
                      "--prompt=hi", f"--out={tmp_path / 'o'}"], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=180)
  assert r.returncode == 2 and "['--labels'] do not apply" in r.stderr, r.stderr
  assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_text_to_image_understanding_and_interleaved(tmp_path):
  """A tiny STARFlow2 checkpoint (seeded random weights) sampled three ways through the command line."""
  config = _config()
  gen = api.Generator.build(config)
  ck = ckpt.save_params(str(tmp_path / "ck"), {"params": jax.device_get(gen.params)}, config)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  run = lambda *a: subprocess.run([sys.executable, "-m", "launch.sample", f"--checkpoint={ck}", *a],  # noqa
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  t2i = tmp_path / "t2i"
  r = run("--prompt=a red circle", "--num=2", "--guidance=1.5", "--jacobi_block=4", f"--out={t2i}")
  assert r.returncode == 0, r.stderr
  rec = json.loads((t2i / "generation.json").read_text())
  assert [row["images"] for row in rec["rows"]] == [["image_0_0.png"], ["image_1_0.png"]]
  assert rec["jacobi_iters"] and rec["settings"]["guidance"] == 1.5
  n = gen.cfg.num_latents
  assert all(len(row["generated_ids"]) == n + 1 for row in rec["rows"])
  assert np.asarray(Image.open(t2i / "image_0_0.png")).shape == (32, 32, 3)
  page = (t2i / "index.html").read_text()
  assert page.count("data:image/png;base64,") == 2 and "a red circle" in page
  image = tmp_path / "in.png"
  Image.open(t2i / "image_0_0.png").save(image)
  vqa = tmp_path / "vqa"
  r = run(f"--image={image}", "--prompt=what is this?", "--max_new_tokens=6", f"--out={vqa}")
  assert r.returncode == 0, r.stderr
  rec = json.loads((vqa / "generation.json").read_text())
  assert rec["kind"] == "understanding" and rec["rows"][0]["images"] == []
  assert rec["rows"][0]["prompt_ids"].count(gen.cfg.specials.image_pad) == n
  assert (vqa / "index.html").read_text().count("data:image/png;base64,") == 1  # the input image
  doc = tmp_path / "doc"
  r = run("--interleaved", "--prompt=draw", "--max_new_tokens=30", "--text_temperature=1", f"--out={doc}")
  assert r.returncode == 0, r.stderr
  rec = json.loads((doc / "generation.json").read_text())
  assert len(rec["rows"][0]["generated_ids"]) <= 30
  r = run("--prompt=again", f"--out={t2i}")
  assert r.returncode == 2 and "exists" in r.stderr
