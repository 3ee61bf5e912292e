"""The demo's evaluation phase: generation from the stage-3 model, scored with the ShapesWorld detector.

  eval/t2i/NNN.png, eval/t2i/prompts.jsonl  one image per held-out caption, {"file", "caption",
                                            "excluded_combination"} per line
  eval/qa.jsonl                             {"question", "answer", "prediction", "file"} per line
  eval/qa/NNN.png                           the held-out images the questions are about
  eval/interleaved/index.html               generated documents mixing text and images (self-contained)
  eval/scores.json                          prompt following by attribute and QA accuracy by type

Held-out captions (`heldout_captions`): the captions of the first test-split scenes, then every
single-object caption of an excluded (colour, kind) combination in each size (the test split keeps those
combinations, the training split never shows them; in the grid layout at each of `EXCLUDED_CELLS`).
Questions: every QA pair of the first test scenes.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os

import numpy as np
from PIL import Image

from starflow2_jax.data import shapesworld
from starflow2_jax.data.shapesworld import SIZES, ShapesWorldSource, describe
from starflow2_jax.eval import metrics, shapes_detector
from starflow2_jax.pretzel.examples import ShapesWorldExamples

PROMPTS_FILE = "prompts.jsonl"
QA_FILE = "qa.jsonl"
SCORES_FILE = "scores.json"
EXCLUDED_CELLS = ("top left", "centre", "bottom right")
HTML_SCALE = 4  # documents show the 32-px images enlarged (nearest neighbour)


def excluded_combination(caption: str, excluded) -> bool:
  """Whether a caption names an object of an excluded (colour, kind) combination."""
  pairs = {tuple(e) for e in excluded}
  return any((o["colour"], o["kind"]) in pairs for o in shapes_detector.parse_caption(caption)["objects"])


def test_world(data) -> ShapesWorldSource:
  return shapesworld.from_config(data, "test")


def heldout_captions(data, num: int) -> list[dict]:
  """[{"caption", "excluded_combination"}]: the first `num` test captions, then the single-object
  captions of every excluded combination in each size (module docstring)."""
  world = test_world(data)
  excluded = [tuple(e) for e in data.shapes_exclude]
  captions = [ShapesWorldSource.caption(world.scene(i)) for i in range(min(num, len(world)))]
  cells = [{"cell": c} for c in EXCLUDED_CELLS] if world.layout == "grid" else [{}]
  captions += [describe({"colour": c, "kind": k, "size": size, **cell}, sized=True)
               for c, k in excluded for size in SIZES for cell in cells]
  return [{"caption": c, "excluded_combination": excluded_combination(c, excluded)} for c in captions]


def heldout_questions(data, num_scenes: int) -> list[dict]:
  """[{"scene": i, "question", "answer"}]: every QA pair of the first `num_scenes` test scenes."""
  world = test_world(data)
  rows = []
  for i in range(min(num_scenes, len(world))):
    qs, ans = ShapesWorldSource.qa(world.scene(i))
    rows += [{"scene": i, "question": q, "answer": a} for q, a in zip(qs, ans)]
  return rows


def document_prompts(data, num: int) -> list[str]:
  """Interleaved prompts of the first `num` test scenes with two or more shapes (documents of two or
  more images)."""
  world = test_world(data)
  source = ShapesWorldExamples(world, "interleaved", int(data.shapes_seed))
  prompts = []
  for i in range(len(world)):
    if len(prompts) == num:
      break
    if len(world.scene(i)) >= 2:
      prompts.append(source.text_record(i)[0]["prompt"])
  return prompts


def _png(path: str, image: np.ndarray) -> None:
  Image.fromarray(np.asarray(image, np.uint8)).save(path)


def write_t2i(out_dir: str, rows: list[dict], images: np.ndarray) -> str:
  """PNGs + prompts.jsonl for rows [{"caption", "excluded_combination"}] and images uint8 [n, S, S, 3]."""
  os.makedirs(out_dir)
  with open(os.path.join(out_dir, PROMPTS_FILE), "w") as f:
    for i, (row, image) in enumerate(zip(rows, images)):
      name = f"{i:03d}.png"
      _png(os.path.join(out_dir, name), image)
      f.write(json.dumps({"file": name, **row}) + "\n")
  return out_dir


def write_qa(eval_dir: str, rows: list[dict], images: np.ndarray, predictions: list[str]) -> str:
  """eval/qa.jsonl and eval/qa/<scene>.png; images uint8 [scenes, S, S, 3] indexed by row["scene"]."""
  image_dir = os.path.join(eval_dir, "qa")
  os.makedirs(image_dir)
  for i in sorted({r["scene"] for r in rows}):
    _png(os.path.join(image_dir, f"{i:03d}.png"), images[i])
  path = os.path.join(eval_dir, QA_FILE)
  with open(path, "w") as f:
    for r, p in zip(rows, predictions):
      f.write(json.dumps({"question": r["question"], "answer": r["answer"], "prediction": p,
                          "file": f"qa/{r['scene']:03d}.png"}) + "\n")
  return path


def _data_uri(image: np.ndarray) -> str:
  img = Image.fromarray(np.asarray(image, np.uint8))
  img = img.resize((img.width * HTML_SCALE, img.height * HTML_SCALE), Image.NEAREST)
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write_documents(out_dir: str, documents: list[tuple[str, list]]) -> str:
  """index.html of [(prompt, parts)], a part being text (str) or an image uint8 [S, S, 3], inline."""
  os.makedirs(out_dir)
  body = []
  for prompt, parts in documents:
    body.append(f"<section><p class='user'><b>user:</b> {html.escape(prompt)}</p><p class='assistant'>"
                "<b>assistant:</b> ")
    for p in parts:
      body.append(html.escape(p) if isinstance(p, str) else f"<img src='{_data_uri(p)}' alt='generated'>")
    body.append("</p></section>")
  page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>STARFlow2 demo: interleaved "
          "documents</title><style>body{font-family:sans-serif;max-width:48em;margin:2em auto}"
          "img{image-rendering:pixelated;vertical-align:middle;margin:0 .3em}section{margin-bottom:2em}"
          "</style></head><body><h1>Interleaved documents</h1>" + "".join(body) + "</body></html>")
  path = os.path.join(out_dir, "index.html")
  with open(path, "w", encoding="utf-8") as f:
    f.write(page)
  return path


def score(eval_dir: str) -> dict:
  """{"prompt_following": ..., "qa": ...} of the written outputs (eval.metrics); also scores.json."""
  scores = {"prompt_following": metrics.shapes_prompt_following(os.path.join(eval_dir, "t2i")),
            "qa": metrics.shapes_qa(os.path.join(eval_dir, QA_FILE))}
  with open(os.path.join(eval_dir, SCORES_FILE), "w") as f:
    json.dump(scores, f, indent=2)
  return scores
