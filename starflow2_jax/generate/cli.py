"""Sampling a STARFlow2 checkpoint to files: what `python -m launch.sample` runs for model_kind
"starflow2" (text-to-image, understanding, interleaved documents).

Writes into OUT, a directory that must not exist yet (nothing is ever overwritten):
  image_<row>_<k>.png   generated image k of conversation row (S x S RGB, the FAE's pixel side)
  generation.json       {kind, prompt, seed, settings, rows: [{prompt_ids, generated_ids, text, images
                        (file names), parts (the document: text pieces and image files in order)}],
                        jacobi_iters (Jacobi only)}
  index.html            one self-contained page: every conversation, its images inline (base64 PNG)
"""
from __future__ import annotations

import base64
import html
import io
import json
import os

import numpy as np
from PIL import Image

from starflow2_jax.errors import UserError
from starflow2_jax.generate.api import Generator

OUTPUTS = ("generation.json", "index.html")


def read_image(path: str, size: int) -> np.ndarray:
  """An RGB image file -> uint8 [size, size, 3]; UserError for a missing file or another size."""
  if not os.path.isfile(path):
    raise UserError(f"--image={path}: no such file")
  with Image.open(path) as im:
    arr = np.asarray(im.convert("RGB"))
  if arr.shape[:2] != (size, size):
    raise UserError(f"--image={path} is {arr.shape[1]}x{arr.shape[0]} pixels, but the model's FAE "
                    f"encodes {size}x{size} images (fae.image_size); resize it to {size}x{size}")
  return arr


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def _uint8(image: np.ndarray) -> np.ndarray:
  """[S, S, 3] float in [0, 1] -> uint8."""
  return np.clip(np.round(np.asarray(image, np.float32) * 255.0), 0, 255).astype(np.uint8)


def render_html(record: dict, pngs: dict, inputs: dict) -> str:
  """The conversations as one page; pngs {file name: PNG bytes}; inputs {row: PNG bytes of its input
  image}."""
  def img(data: bytes, alt: str) -> str:
    src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<img src="{src}" alt="{html.escape(alt)}" width="256" style="image-rendering:pixelated">'

  body = [f"<h1>STARFlow2 {html.escape(record['kind'])}</h1>",
          f"<p>seed {record['seed']}, guidance {record['settings']['guidance']}</p>"]
  for r, row in enumerate(record["rows"]):
    user = [html.escape(record["prompt"])]
    if r in inputs:
      user.insert(0, img(inputs[r], "input image"))
    body.append(f'<div class="turn user"><b>user</b><br>{"<br>".join(user)}</div>')
    parts = [img(pngs[p["image"]], p["image"]) if isinstance(p, dict) else
             f"<p>{html.escape(p)}</p>" for p in row["parts"]]
    body.append(f'<div class="turn assistant"><b>assistant</b> (row {r})<br>{"".join(parts)}</div>')
  style = ("body{font-family:sans-serif;max-width:48em;margin:auto}.turn{border:1px solid #ccc;"
           "border-radius:6px;padding:.5em;margin:.5em 0}.user{background:#f4f4f4}")
  return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>STARFlow2 samples</title>"
          f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def sample_to_dir(checkpoint: str, out: str, *, kind: str, prompt: str, num: int = 1,
                  image: str | None = None, seed: int = 0, gen: Generator | None = None,
                  **overrides) -> dict:
  """Run one request (`num` conversations of `prompt`; understanding: of the --image file) and write
  OUT's files. overrides: `api.sample_settings` keys (None: the checkpoint's config.sample). gen: the
  checkpoint already loaded (`Generator.from_checkpoint(checkpoint)`, on every device of its mesh)."""
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.exists(out):
    raise UserError(f"--out={out} exists; choose a new directory (samples never overwrite anything)")
  if num < 1:
    raise UserError(f"--num={num}: expected at least 1 conversation")
  gen = gen or Generator.from_checkpoint(checkpoint)
  images = None
  if kind == "understanding":
    images = np.stack([read_image(image, gen.fae.image_size)] * num)
  result = gen.run(kind, [prompt] * num, images=images, seed=seed, **overrides)
  os.makedirs(out)
  pngs, rows = {}, []
  for r in range(num):
    files = []
    for k, im in enumerate(result["images"][r]):
      name = f"image_{r}_{k}.png"
      pngs[name] = _png(_uint8(im))
      with open(os.path.join(out, name), "xb") as f:
        f.write(pngs[name])
      files.append(name)
    parts = [{"image": files[p]} if isinstance(p, int) else p for p in result["parts"][r]]
    rows.append({"prompt_ids": result["prompt_ids"][r], "generated_ids": result["generated_ids"][r],
                 "text": result["text"][r], "images": files, "parts": parts})
  record = {"kind": kind, "prompt": prompt, "seed": seed, "checkpoint": os.path.abspath(checkpoint),
            "settings": gen.settings(**overrides), "rows": rows}
  if "jacobi_iters" in result:
    record["jacobi_iters"] = result["jacobi_iters"]
  inputs = {r: _png(images[r]) for r in range(num)} if images is not None else {}
  with open(os.path.join(out, "generation.json"), "x") as f:
    json.dump(record, f, indent=2)
  with open(os.path.join(out, "index.html"), "x") as f:
    f.write(render_html(record, pngs, inputs))
  return {"out": out, "kind": kind, "num": num, "images": sum(len(r["images"]) for r in rows),
          "text": [r["text"] for r in rows]}
