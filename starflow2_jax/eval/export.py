"""GenEval and DPG-Bench: images of a STARFlow2 checkpoint for the benchmarks' own prompt files, written
in the folder layouts their official scoring scripts read (the scores come from those tools).

GenEval (djghosh13/geneval; prompts/evaluation_metadata.jsonl holds one {"tag", "include", "prompt",
...} object per line), as its generation/diffusers_generate.py writes it:
  OUT/<index:05d>/metadata.jsonl        the prompt's line of the metadata file (one JSON object)
  OUT/<index:05d>/samples/<k:05d>.png   sample k of that prompt, S x S RGB (S: the FAE's pixel side)
  OUT/generation.json                   checkpoint, seed, sampling settings (evaluation/
                                        evaluate_images.py reads only the numbered folders)
DPG-Bench (TencentQQGYLab/ELLA, dpg_bench/prompts/<name>.txt: one prompt per file):
  OUT/<name>.png   the num_samples (1-4) samples of prompt <name> as one grid of S x S cells, two per
                   row, where dpg_bench/compute_dpg_bench.py --pic-num crops them: sample k at column
                   k % 2, row k // 2 (cells it does not read stay black). Nothing else is written into
                   OUT: the scorer opens every file there.

Generation: every (prompt, sample) pair is one text-to-image request of `generate.api.Generator`, sent in
fixed chunks of `chunk` requests (one compilation; a short last chunk is padded with its last request and
the padding dropped); chunk c uses seed + c. Sampling settings: the checkpoint's config.sample, updated
by `overrides` (any key of `generate.api.sample_settings`).
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from starflow2_jax import logging_utils
from starflow2_jax.demo.generation import DemoGenerator, to_uint8
from starflow2_jax.errors import UserError
from starflow2_jax.eval import metrics

BENCHMARKS = ("geneval", "dpg_bench")
GENEVAL_FIELDS = ("prompt", "tag")  # what evaluate_images.py reads of every metadata line
DPG_MAX_SAMPLES = 4  # compute_dpg_bench.py crops at most a 2 x 2 grid
DPG_COLUMNS = 2
RECORD_FILE = "generation.json"


def check_new_dir(out: str) -> str:
  """`out` as an absolute path that does not exist yet (nothing is ever overwritten)."""
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.exists(out):
    raise UserError(f"--out={out} exists; choose a new directory (benchmark images never overwrite "
                    "anything)")
  return out


def read_geneval_prompts(path: str) -> list[dict]:
  """The metadata lines of a GenEval prompt file (evaluation_metadata.jsonl), in order; an empty line
  or a line without a non-empty "prompt" and a "tag" is an error naming the line."""
  rows = metrics.read_jsonl(path, GENEVAL_FIELDS)
  for i, r in enumerate(rows, 1):
    if not isinstance(r["prompt"], str) or not r["prompt"].strip():
      raise UserError(f"{path} line {i}: \"prompt\" must be a non-empty string, found {r['prompt']!r}")
  return rows


def read_dpg_prompts(folder: str) -> list[tuple[str, str]]:
  """[(name, prompt)] of a DPG-Bench prompt folder (<name>.txt, one prompt each), sorted by name; an
  empty file, or one with more than one non-empty line, is an error naming the file."""
  folder = os.path.abspath(os.path.expanduser(folder))
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"--prompts={folder} not found: DPG-Bench reads a folder of <name>.txt "
                            "prompts (ELLA's dpg_bench/prompts)")
  names = sorted(f for f in os.listdir(folder) if f.endswith(".txt"))
  if not names:
    raise UserError(f"--prompts={folder} holds no <name>.txt prompt files (ELLA's dpg_bench/prompts)")
  rows = []
  for f in names:
    name = f[:-len(".txt")]
    if "." in name:  # compute_dpg_bench.py keys an image by its name up to the first "."
      raise UserError(f"{os.path.join(folder, f)}: a prompt name must not contain '.', found {name!r}")
    with open(os.path.join(folder, f), encoding="utf-8") as fh:
      lines = [line.strip() for line in fh.read().splitlines() if line.strip()]
    if len(lines) != 1:
      raise UserError(f"{os.path.join(folder, f)}: expected one prompt (one non-empty line), found "
                      f"{len(lines)} non-empty lines" + ("; the file is empty" if not lines else ""))
    rows.append((name, lines[0]))
  return rows


def check_dpg_samples(n: int) -> int:
  if not 1 <= n <= DPG_MAX_SAMPLES:
    raise UserError(f"--num_samples={n}: DPG-Bench scores 1 to {DPG_MAX_SAMPLES} samples per prompt "
                    "(compute_dpg_bench.py --pic-num)")
  return n


def dpg_grid(images: np.ndarray) -> np.ndarray:
  """uint8 [n, S, S, 3] (1 <= n <= 4) -> the grid compute_dpg_bench.py crops (module docstring):
  [S, S, 3] for one sample, [S, 2S, 3] for two, [2S, 2S, 3] for three or four."""
  n, s = check_dpg_samples(len(images)), images.shape[1]
  cols = min(n, DPG_COLUMNS)
  rows = -(-n // DPG_COLUMNS)
  grid = np.zeros((rows * s, cols * s, 3), np.uint8)
  for k, im in enumerate(images):
    r, c = divmod(k, DPG_COLUMNS)
    grid[r * s:(r + 1) * s, c * s:(c + 1) * s] = im
  return grid


def samples_per_prompt(gen: DemoGenerator, prompts: Sequence[str], num_samples: int, seed: int,
                       overrides: dict) -> Iterator[tuple[int, np.ndarray]]:
  """(prompt index, uint8 [num_samples, S, S, 3]) in prompt order, as soon as a prompt's samples are
  drawn (module docstring: chunks of gen.chunk requests, chunk c with seed + c)."""
  pairs = [p for p in range(len(prompts)) for _ in range(num_samples)]
  done: dict[int, list[np.ndarray]] = {}
  bar = logging_utils.Progress(len(pairs), 0)
  try:
    for c, start in enumerate(range(0, len(pairs), gen.chunk)):
      idx = pairs[start:start + gen.chunk]
      texts = [prompts[i] for i in idx] + [prompts[idx[-1]]] * (gen.chunk - len(idx))
      res = gen.gen.run("text_to_image", texts, seed=seed + c, **overrides)
      for i, row in zip(idx, res["images"]):
        done.setdefault(i, []).append(to_uint8(row[0]))
        if len(done[i]) == num_samples:
          yield i, np.stack(done.pop(i))
      bar.update(len(idx))
  finally:
    bar.close()


def export_geneval(gen: DemoGenerator, rows: list[dict], out: str, *, num_samples: int = 4, seed: int = 0,
                   overrides: dict | None = None, record: dict | None = None) -> str:
  """GenEval's layout (module docstring) of `rows` (read_geneval_prompts) in the new folder `out`."""
  if num_samples < 1:
    raise UserError(f"--num_samples must be >= 1 (GenEval's default: 4), got {num_samples}")
  out = check_new_dir(out)
  os.makedirs(out)
  overrides = dict(overrides or {})
  for i, images in samples_per_prompt(gen, [r["prompt"] for r in rows], num_samples, seed, overrides):
    folder = os.path.join(out, f"{i:05d}")
    os.makedirs(os.path.join(folder, "samples"))
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
      json.dump(rows[i], f)
    for k, im in enumerate(images):
      Image.fromarray(im).save(os.path.join(folder, "samples", f"{k:05d}.png"))
  with open(os.path.join(out, RECORD_FILE), "w") as f:
    json.dump({**(record or {}), "benchmark": "geneval", "prompts": len(rows), "num_samples": num_samples,
               "seed": seed, "settings": gen.gen.settings(**overrides),
               "image_size": int(gen.image_size)}, f, indent=2)
  return out


def export_dpg_bench(gen: DemoGenerator, rows: list[tuple[str, str]], out: str, *, num_samples: int = 4,
                     seed: int = 0, overrides: dict | None = None) -> str:
  """DPG-Bench's layout (module docstring) of `rows` (read_dpg_prompts) in the new folder `out`."""
  check_dpg_samples(num_samples)
  out = check_new_dir(out)
  os.makedirs(out)
  for i, images in samples_per_prompt(gen, [p for _, p in rows], num_samples, seed, dict(overrides or {})):
    Image.fromarray(dpg_grid(images)).save(os.path.join(out, f"{rows[i][0]}.png"))
  return out


def scoring_command(benchmark: str, out: str, num_samples: int, image_size: int) -> str:
  """The official scoring command of an exported folder (run in a clone of the benchmark's repo)."""
  if benchmark == "geneval":
    return (f"python evaluation/evaluate_images.py {out} --outfile RESULTS/results.jsonl "
            "--model-path OBJECT_DETECTOR_FOLDER && python evaluation/summary_scores.py "
            "RESULTS/results.jsonl")
  return f"PIC_NUM={num_samples} bash dpg_bench/dist_eval.sh {out} {image_size}"
