"""GenEval / DPG-Bench export and the generated ShapesWorld prompt-following proxy on a tiny STARFlow2
checkpoint (seeded random weights, saved on the spot): the folder layouts the official scorers read,
parsed back as they parse them; bad input (empty prompt line, missing file, existing output folder) is
a clear error and nothing is overwritten."""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from starflow2_jax import ckpt
from starflow2_jax.demo.generation import DemoGenerator
from starflow2_jax.errors import UserError
from starflow2_jax.eval import export, shapes_detector, shapes_generation
from launch import benchmark
from starflow2_jax.generate import api

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import starflow2_tiny  # noqa: E402

CHUNK = 8  # requests per generation call: every request below is one call of one compiled function
SIDE = 32  # the tiny FAE's pixel side
JACOBI_BLOCK = 4
# Generation pads a chunk's prompts to its longest one, so every chunk below (and the benchmark part)
# has the same longest prompt, benchmark.GENERATION_CAPTION: one compiled shape per request kind.
GENEVAL = [
    {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a circle"},
    {"tag": "counting", "include": [{"class": "circle", "count": 2}],
     "exclude": [{"class": "circle", "count": 3}], "prompt": "a red circle"},
    {"tag": "colors", "include": [{"class": "circle", "count": 1, "color": "red"}],
     "prompt": benchmark.GENERATION_CAPTION}]
DPG = {"1": benchmark.GENERATION_CAPTION, "256": "a small circle"}
# compute_dpg_bench.py's crops of a grid of side-`r` cells, in sample order
DPG_CROPS = lambda r: [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)]  # noqa: E731


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  config = starflow2_tiny.get_config("stage=3")
  config.sample.max_new_tokens = 8  # short greedy answers
  gen = api.Generator.build(config)
  return ckpt.save_params(str(tmp_path_factory.mktemp("s2") / "params_0000001"),
                          {"params": jax.device_get(gen.params)}, config)


@pytest.fixture(scope="module")
def gen(checkpoint):
  return DemoGenerator(checkpoint, chunk=CHUNK)


def _geneval_file(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _dpg_folder(path, prompts):
  path.mkdir()
  for name, text in prompts.items():
    (path / f"{name}.txt").write_text(text)
  return str(path)


def _read_geneval_like_the_scorer(folder):
  """evaluation/evaluate_images.py's walk: numbered sub-folders, metadata.jsonl, samples/<digits>.png."""
  found = {}
  for sub in os.listdir(folder):
    path = os.path.join(folder, sub)
    if not os.path.isdir(path) or not sub.isdigit():
      continue
    with open(os.path.join(path, "metadata.jsonl")) as f:
      metadata = json.load(f)
    images = [np.asarray(Image.open(os.path.join(path, "samples", n)))
              for n in sorted(os.listdir(os.path.join(path, "samples"))) if re.match(r"\d+\.png", n)]
    found[int(sub)] = (metadata, images)
  return found


def test_geneval_and_dpg_layouts_parse_back(gen, tmp_path):
  rows = export.read_geneval_prompts(_geneval_file(tmp_path / "evaluation_metadata.jsonl", GENEVAL))
  # Jacobi decoding of the image span here, sequential below: test_benchmark_generation_part reuses both
  out = export.export_geneval(gen, rows, str(tmp_path / "geneval"), num_samples=2, seed=3,
                              overrides={"jacobi_block": JACOBI_BLOCK})
  assert sorted(os.listdir(out)) == ["00000", "00001", "00002", export.RECORD_FILE]
  found = _read_geneval_like_the_scorer(out)
  assert [found[i][0] for i in range(3)] == GENEVAL  # each folder holds its prompt's metadata line
  for _, images in found.values():
    assert len(images) == 2 and all(im.shape == (SIDE, SIDE, 3) and im.dtype == np.uint8 for im in images)
  assert not np.array_equal(found[0][1][0], found[0][1][1])  # two samples, two noises
  record = json.loads((tmp_path / "geneval" / export.RECORD_FILE).read_text())
  assert record["num_samples"] == 2 and record["prompts"] == 3 and record["image_size"] == SIDE
  assert record["settings"]["jacobi_block"] == JACOBI_BLOCK

  names = export.read_dpg_prompts(_dpg_folder(tmp_path / "prompts", DPG))
  assert names == sorted(DPG.items())
  out = export.export_dpg_bench(gen, names, str(tmp_path / "dpg"), num_samples=3)
  assert sorted(os.listdir(out)) == ["1.png", "256.png"]  # nothing else: the scorer opens every file
  for name in DPG:
    grid = Image.open(os.path.join(out, f"{name}.png"))
    assert grid.size == (2 * SIDE, 2 * SIDE) and grid.mode == "RGB"
    crops = [np.asarray(grid.crop(c)) for c in DPG_CROPS(SIDE)]
    assert all(c.std() > 0 for c in crops[:3]) and not crops[3].any()  # 3 samples, the 4th cell unused


def test_dpg_grid_is_where_the_scorer_crops():
  images = np.random.default_rng(0).integers(0, 256, (4, 5, 5, 3), dtype=np.uint8)
  for n in range(1, 5):
    grid = Image.fromarray(export.dpg_grid(images[:n]))
    assert grid.size == (5 * min(n, 2), 5 * (1 + (n > 2)))
    for k, box in enumerate(DPG_CROPS(5)[:n]):
      np.testing.assert_array_equal(np.asarray(grid.crop(box)), images[k])
  with pytest.raises(UserError, match="--num_samples=5: DPG-Bench scores 1 to 4"):
    export.dpg_grid(np.zeros((5, 2, 2, 3), np.uint8))


def test_bad_prompt_files_and_existing_output(tmp_path):
  lines = [json.dumps(r) for r in GENEVAL]
  bad = tmp_path / "bad.jsonl"
  bad.write_text(lines[0] + "\n\n" + lines[1] + "\n")
  with pytest.raises(UserError, match="bad.jsonl line 2 is empty"):
    export.read_geneval_prompts(str(bad))
  bad.write_text(json.dumps({"prompt": "a cat"}) + "\n")
  with pytest.raises(UserError, match=r"line 1: missing \['tag'\]"):
    export.read_geneval_prompts(str(bad))
  with pytest.raises(FileNotFoundError, match="missing.jsonl not found"):
    export.read_geneval_prompts(str(tmp_path / "missing.jsonl"))
  folder = _dpg_folder(tmp_path / "dpg_prompts", {"1": "a cat", "2": "\n \n"})
  with pytest.raises(UserError, match=r"2.txt: expected one prompt .*the file is empty"):
    export.read_dpg_prompts(folder)
  with pytest.raises(FileNotFoundError, match="DPG-Bench reads a folder"):
    export.read_dpg_prompts(str(tmp_path / "nowhere"))
  out = tmp_path / "taken"
  out.mkdir()
  (out / "mine.png").write_bytes(b"keep")
  rows = export.read_geneval_prompts(_geneval_file(tmp_path / "ok.jsonl", GENEVAL))
  for fn, r in ((export.export_geneval, rows), (export.export_dpg_bench, [("1", "a cat")])):
    with pytest.raises(UserError, match="taken exists; choose a new directory"):
      fn(None, r, str(out))  # refused before any generation
  assert os.listdir(out) == ["mine.png"] and (out / "mine.png").read_bytes() == b"keep"


def test_command_line_refuses_an_existing_output_folder(tmp_path):
  out = tmp_path / "taken"
  out.mkdir()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  r = subprocess.run([sys.executable, "-m", "launch.export_benchmark", "--benchmark=geneval",
                      f"--checkpoint={tmp_path}", f"--prompts={tmp_path / 'p.jsonl'}", f"--out={out}"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "exists; choose a new directory" in r.stderr, r.stderr
  assert os.listdir(out) == []


def test_generated_shapes_proxy(gen, tmp_path):
  """Held-out captions -> images -> detector scores (--metric=qa's questions -> answers path runs the
  demo's DemoGenerator.answer, which tests/test_demo.py covers; one understanding compile less here)."""
  res = shapes_generation.generated_proxies(gen, str(tmp_path), ("shapes",), num_captions=2, num_scenes=1)
  assert set(res) == {"shapes"}
  t2i = res["shapes"]["samples"]
  assert t2i == str(tmp_path / shapes_generation.T2I_DIR)
  assert set(shapes_detector.ATTRIBUTES) <= set(res["shapes"]["overall"])
  assert res["shapes"]["overall"]["num"] == 2
  with open(os.path.join(t2i, "prompts.jsonl")) as f:
    prompts = [json.loads(line) for line in f]
  assert len(prompts) == 2 and all(os.path.isfile(os.path.join(t2i, p["file"])) for p in prompts)
  assert len(os.listdir(t2i)) == len(prompts) + 1
  # a second evaluation writes beside the first, never over it
  assert shapes_generation.new_dir(str(tmp_path), shapes_generation.T2I_DIR) == t2i + ".1"


def test_benchmark_generation_part(gen):
  """launch.benchmark's generation part on this module's model (both calls compiled above)."""
  g = benchmark.bench_generation(benchmark.Settings.quick(batch=CHUNK, jacobi_block=JACOBI_BLOCK), gen.gen)
  assert g["sequential"]["images"] == g["jacobi"]["images"] == CHUNK and g["jacobi_iters"]
  assert g["sequential"]["per_image_s"] > 0 and g["jacobi"]["per_image_s"] > 0
