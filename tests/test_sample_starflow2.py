"""`python -m launch.sample` for STARFlow2 checkpoints (issue 10): text-to-image, understanding and
interleaved documents to PNGs, generation.json and a self-contained index.html; generation on a mesh
(Jacobi iteration counts equal on every device); training-time samples; bad input. One tiny checkpoint
and its loaded Generator are shared by the module (one compiled guided Jacobi text-to-image generator
serves three tests)."""
import dataclasses
import json
import os
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from starflow2_jax import ckpt, parallel
from starflow2_jax.errors import UserError
from starflow2_jax.generate import api, cli
from starflow2_jax.train import loop as train_loop, pretzel_task

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


T2I = dict(guidance=1.5, jacobi_block=4)  # one compiled guided Jacobi generator for three tests


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
  """A tiny STARFlow2 checkpoint (seeded random weights) loaded back on the config's mesh: every one
  of the 8 test devices (data=8), the Pretzel and frozen params placed by the same rules."""
  config = _config()
  params = jax.device_get(api.Generator.build(config).params)
  ck = ckpt.save_params(str(tmp_path_factory.mktemp("s2") / "ck"), {"params": params}, config)
  return config, ck, api.Generator.from_checkpoint(ck)


def test_text_to_image_understanding_and_interleaved(loaded, tmp_path):
  """The command line's three modes (`cli.sample_to_dir`, what `launch.sample` runs) on a checkpoint
  restored over all 8 devices: PNGs, generation.json, index.html; an existing --out is refused."""
  _, ck, gen = loaded
  assert gen.mesh.size == jax.device_count() == 8
  run = lambda out, **kw: cli.sample_to_dir(ck, str(tmp_path / out), gen=gen, **kw)  # noqa: E731
  run("t2i", kind="text_to_image", prompt="a red circle", num=2, **T2I)
  t2i = tmp_path / "t2i"
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
  run("vqa", kind="understanding", prompt="what is this?", image=str(image), max_new_tokens=6)
  rec = json.loads((tmp_path / "vqa" / "generation.json").read_text())
  assert rec["kind"] == "understanding" and rec["rows"][0]["images"] == []
  assert rec["rows"][0]["prompt_ids"].count(gen.cfg.specials.image_pad) == n
  assert (tmp_path / "vqa" / "index.html").read_text().count("data:image/png;base64,") == 1
  run("doc", kind="interleaved", prompt="draw", max_new_tokens=8, denoise="none")
  rec = json.loads((tmp_path / "doc" / "generation.json").read_text())
  assert rec["kind"] == "interleaved" and len(rec["rows"][0]["generated_ids"]) <= 8
  with pytest.raises(UserError, match="exists"):
    run("t2i", kind="text_to_image", prompt="again")


def test_jacobi_iterations_equal_on_every_device(loaded):
  """Property 21 (d): 8 different captions, one per device of the data=8 mesh, give the Jacobi
  iteration counts of the same request on one device (the convergence test is a mean over the whole
  batch), and the same tokens and images."""
  config, _, gen = loaded
  mesh = parallel.make_mesh({"shape": {"data": 1}}, jax.devices()[:1])
  one = jax.device_put((gen.params, gen.vlm_params, gen.fae_params), parallel.replicated(mesh))
  one = dataclasses.replace(gen, params=one[0], vlm_params=one[1], fae_params=one[2], mesh=mesh)
  captions = [f"a {c} {s}" for c in ("red", "blue") for s in ("circle", "square", "cross", "star")]
  runs = [g.run("text_to_image", captions, seed=3, denoise="none", **T2I) for g in (gen, one)]
  iters = [r["jacobi_iters"] for r in runs]
  assert iters[0] == iters[1] and len(iters[0]) == gen.cfg.num_latents // T2I["jacobi_block"]
  assert max(iters[0]) < api.sample_settings(config)["jacobi_max_iter"]  # the threshold decided
  assert runs[0]["generated_ids"] == runs[1]["generated_ids"]
  a, b = (np.stack([im[0] for im in r["images"]]) for r in runs)
  assert np.max(np.abs(a - b)) <= 1e-5


def test_training_samples(loaded, tmp_path):
  """`Task.sample_fn` of model_kind starflow2 (`pretzel_task.build` with config.log.num_samples > 0
  takes `api.training_sampler`): text-to-image samples of held-out captions, written by the training
  loop's image writer."""
  config, _, gen = loaded
  config = config.copy_and_resolve_references()
  config.log.num_samples = 2
  config.sample = ml_collections.ConfigDict(dict(denoise="none", **T2I))
  sample_fn = api.training_sampler(config, gen.model, gen.vlm, gen.fae,
                                   pretzel_task.tokenizer_path(config.tokenizer), gen.mesh, gen.rules)
  frozen = {"vlm": gen.vlm_params, "fae": gen.fae_params}
  images = sample_fn(gen.params, frozen, jax.random.key(0), 2)
  assert images.shape == (2, 32, 32, 3) and images.dtype == np.float32
  assert np.all(np.abs(images) <= 1) and not np.allclose(images[0], images[1])
  captions = api.held_out_captions(config, 2)
  assert captions[0] != captions[1]
  task = types.SimpleNamespace(sample_fn=sample_fn)  # write_samples reads only the task's sample_fn
  path = train_loop.write_samples(task, gen.params, frozen, jax.random.key(0), 2,
                                  str(tmp_path / "samples.png"), gen.mesh, gen.rules)
  assert np.asarray(Image.open(path)).shape[2] == 3
