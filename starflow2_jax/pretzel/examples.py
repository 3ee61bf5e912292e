"""Example sources for the Pretzel transform: random-access sources (len, [i]) of the records of
`pretzel.sequence`, for the grain pipeline (`data.pipeline.train_iterator` / `eval_batches`).

  data.name = "pretzel" (`default_data_config()`), data.examples_from picks the base data:
  shapesworld  ShapesWorld (data/shapesworld.py), every kind:
    text_to_image  the caption and the image
    understanding  one of the scene's questions ("what colour is the circle?") or the captioning
                   question CAPTION_QUESTION, with its answer, drawn per record
    editing        "add a blue square" (source without the scene's last shape), "remove the blue
                   square" (the reverse), or for one shape "make the red circle small"
    interleaved    the scene drawn one shape at a time: "here is a large red circle:<image> and here it
                   is above a blue square:<image>"; a one-shape scene continues with the next record's
                   scene ("... and here is a small green cross:<image>")
  folder       a caption folder of the user's (`CaptionFolder`: captions.jsonl as data/folder.py, or
               images with same-named .txt captions): text_to_image and understanding (captioning)
  tfds         a tfds array_record dataset with image and caption fields (data/tfds_source.py): the same
               two kinds
  data.mixture = {kind: weight}: record j of the mixture is a kind drawn with these weights from
  (data.mixture_seed, j) and a record of that kind's source drawn from the same RNG (`Mixture`, of
  length data.mixture_size in the training split, else or when 0 the base source's length).
  data.pack > 1 groups data.pack consecutive mixture records into one packed record
  (`data.pipeline.Packed`, applied by `pipeline.build_source`).
"""
from __future__ import annotations

import os

import ml_collections
import numpy as np

from starflow2_jax.data import pipeline, shapesworld
from starflow2_jax.data.folder import INDEX_FILE, FolderSource
from starflow2_jax.data.shapesworld import SIZES, ShapesWorldSource, describe, relation
from starflow2_jax.data.tfds_source import TfdsSource
from starflow2_jax.errors import UserError
from starflow2_jax.pretzel.sequence import KINDS
from starflow2_jax.vlm.tokenizer import DEFAULT_SYSTEM

CAPTION_QUESTION = "describe the image."
BASES = ("shapesworld", "folder", "tfds")
CAPTION_KINDS = ("text_to_image", "understanding")  # what image-caption data gives
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_KIND_STREAM = {k: 10 + i for i, k in enumerate(KINDS)}  # sub-streams of the per-record draws
_MIX_STREAM = 20


def default_data_config() -> ml_collections.ConfigDict:
  """`data.pipeline.default_data_config()` for Pretzel examples (the fields of this module and of
  `sequence.SequenceSpec.from_config`)."""
  data = pipeline.default_data_config()
  data.update({"name": "pretzel", "image_size": 32, "channels": 3, "flip": False})
  data.examples_from = "shapesworld"  # shapesworld | folder | tfds
  data.mixture = {"text_to_image": 1.0, "understanding": 1.0, "editing": 0.0, "interleaved": 0.0}
  data.mixture_size = 0  # records per training epoch of the mixture (0: the base source's length)
  data.mixture_seed = 0  # the mixture's draws (which kind and record each mixture record is)
  data.max_len = 1024
  data.max_images = 2
  data.system_prompt = DEFAULT_SYSTEM  # None: no system turn
  data.caption_dropout = 0.1
  data.caption_question = CAPTION_QUESTION  # the captioning question of folder / tfds data
  data.tfds_image_key = "image"
  data.tfds_caption_key = "caption"
  return data


def shapes_understanding(shapes: list[dict], rng: np.random.Generator) -> tuple[str, str]:
  """(question, answer): one of the scene's QA pairs or the captioning question, uniformly."""
  qs, ans = ShapesWorldSource.qa(shapes)
  qs, ans = qs + [CAPTION_QUESTION], ans + [ShapesWorldSource.caption(shapes)]
  k = int(rng.integers(len(qs)))
  return qs[k], ans[k]


def _resized(s: dict, size: str) -> dict:
  r = SIZES[size] / 2  # keep the shape inside the image at its new size
  return {**s, "size": size, "x": min(max(s["x"], r), 1 - r), "y": min(max(s["y"], r), 1 - r)}


def shapes_edit(shapes: list[dict], rng: np.random.Generator) -> tuple[str, list[dict], list[dict]]:
  """(instruction, source scene, target scene)."""
  if len(shapes) == 1:
    s = shapes[0]
    other = next(z for z in SIZES if z != s["size"])
    return f"make the {s['colour']} {s['kind']} {other}.", shapes, [_resized(s, other)]
  last = shapes[-1]
  if rng.random() < 0.5:
    return f"add {describe(last)}.", shapes[:-1], shapes
  return f"remove the {last['colour']} {last['kind']}.", shapes, shapes[:-1]


def shapes_interleaved(shapes: list[dict], more: list[dict]) -> tuple[str, list, list[list[dict]]]:
  """(prompt, parts, the scene of each image): `shapes` drawn one shape at a time; a one-shape scene
  continues with the scene `more` (the next record's)."""
  parts, scenes = [f"here is {describe(shapes[0], sized=True)}:", 0], [shapes[:1]]
  if len(shapes) == 1:
    parts += [f" and here is {ShapesWorldSource.caption(more)}:", 1]
    scenes.append(more)
    prompt = f"draw {describe(shapes[0], sized=True)}, then {ShapesWorldSource.caption(more)}."
  else:
    for m, s in enumerate(shapes[1:], 1):
      text = (f" and here it is {relation(shapes[0], s)} {describe(s)}:" if m == 1 else
              f" and now with {describe(s)} too:")
      parts += [text, m]
      scenes.append(shapes[:m + 1])
    prompt = f"draw {ShapesWorldSource.caption(shapes)}, one shape at a time."
  return prompt, parts, scenes


class ShapesWorldExamples:
  """Random-access source of `kind` records from a ShapesWorld split (record i from scene i; the
  per-record choices are drawn from (seed, i, kind))."""

  def __init__(self, world: ShapesWorldSource, kind: str, seed: int = 0):
    if kind not in KINDS:
      raise UserError(f"ShapesWorld example kind {kind!r}: expected one of {KINDS}")
    self.world, self.kind, self.seed = world, kind, int(seed)

  def __len__(self) -> int:
    return len(self.world)

  def _rng(self, i: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, int(i), _KIND_STREAM[self.kind]])

  def text_record(self, i: int) -> tuple[dict, list[list[dict]]]:
    """Record i without its images, and the scene of each image."""
    shapes = self.world.scene(int(i))
    kind = self.kind
    if kind == "text_to_image":
      return {"kind": kind, "caption": ShapesWorldSource.caption(shapes)}, [shapes]
    if kind == "understanding":
      q, a = shapes_understanding(shapes, self._rng(i))
      return {"kind": kind, "question": q, "answer": a}, [shapes]
    if kind == "editing":
      instruction, source, target = shapes_edit(shapes, self._rng(i))
      return {"kind": kind, "instruction": instruction}, [source, target]
    prompt, parts, scenes = shapes_interleaved(shapes, self.world.scene((int(i) + 1) % len(self.world)))
    return {"kind": kind, "prompt": prompt, "parts": parts}, scenes

  def __getitem__(self, i: int) -> dict:
    record, scenes = self.text_record(i)
    return {**record, "images": [self.world.render(s) for s in scenes]}


class CaptionFolder(FolderSource):
  """A caption folder: DIR/captions.jsonl (data/folder.py), or else every image DIR/**/NAME.png (.jpg,
  ...) with its caption in NAME.txt next to it. Images must be `image_size` square RGB."""

  def __init__(self, directory: str, image_size: int):
    path = os.path.abspath(os.path.expanduser(directory))
    if os.path.isfile(os.path.join(path, INDEX_FILE)):
      super().__init__(directory, image_size, 3)
      return
    if not os.path.isdir(path):
      raise FileNotFoundError(f"data.dir={directory}: no such directory (a caption folder holds "
                              f"{INDEX_FILE} or images with same-named .txt captions)")
    self.dir, self.image_size, self.channels, self.entries = path, image_size, 3, []
    for root, _, files in sorted(os.walk(path)):
      for f in sorted(files):
        stem, ext = os.path.splitext(f)
        txt = os.path.join(root, stem + ".txt")
        if ext.lower() in IMAGE_SUFFIXES and os.path.isfile(txt):
          with open(txt, encoding="utf-8") as fh:
            caption = fh.read().strip()
          self.entries.append({"image": os.path.relpath(os.path.join(root, f), path), "caption": caption})
    if not self.entries:
      raise UserError(f"data.dir={directory}: found neither {INDEX_FILE} nor images ({IMAGE_SUFFIXES}) "
                      "with same-named .txt captions")


class CaptionExamples:
  """Random-access source of text_to_image or understanding (captioning: `question` -> the caption)
  records from a source of {"image", "caption"} records."""

  def __init__(self, source, kind: str, question: str = CAPTION_QUESTION):
    if kind not in CAPTION_KINDS:
      raise UserError(f"image-caption data gives the kinds {CAPTION_KINDS}, not {kind!r}: set "
                      "data.mixture weights of the other kinds to 0")
    self.source, self.kind, self.question = source, kind, question

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    r = self.source[int(i)]
    if "caption" not in r:
      raise UserError(f"record {i} has no caption (fields {sorted(r)}): text_to_image and captioning "
                      "examples need image-caption data (data.tfds_caption_key for tfds)")
    image = np.asarray(r["image"], np.uint8)
    if self.kind == "text_to_image":
      return {"kind": self.kind, "caption": r["caption"], "images": [image]}
    return {"kind": self.kind, "question": self.question, "answer": r["caption"], "images": [image]}


def _check_weights(weights) -> dict[str, float]:
  weights = weights.to_dict() if isinstance(weights, ml_collections.ConfigDict) else dict(weights)
  weights = {k: float(v) for k, v in weights.items()}
  unknown = sorted(set(weights) - set(KINDS))
  if unknown or any(v < 0 for v in weights.values()) or not sum(weights.values()) > 0:
    raise UserError(f"data.mixture={weights}: expected non-negative weights of kinds {KINDS}, at least "
                    "one positive")
  return {k: v for k, v in weights.items() if v > 0}


class Mixture:
  """Random-access mixture: record j is a kind drawn with `weights` and a uniformly drawn record of
  that kind's source, both from (seed, j). sources: {kind: source}, weights: {kind: weight > 0}."""

  def __init__(self, sources: dict, weights: dict, length: int, seed: int = 0):
    self.weights = _check_weights(weights)
    missing = sorted(set(self.weights) - set(sources))
    if missing:
      raise UserError(f"data.mixture gives weight to {missing}, but there is no source of them")
    self.kinds = sorted(self.weights)
    p = np.array([self.weights[k] for k in self.kinds])
    self.p = p / p.sum()
    self.sources, self.length, self.seed = sources, int(length), int(seed)

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, j: int) -> dict:
    if not 0 <= j < self.length:
      raise IndexError(f"the mixture has {self.length} records, asked for {j}")
    rng = np.random.default_rng([self.seed, int(j), _MIX_STREAM])
    kind = self.kinds[int(rng.choice(len(self.kinds), p=self.p))]
    src = self.sources[kind]
    return src[int(rng.integers(len(src)))]


def kind_sources(data: ml_collections.ConfigDict, split: str, kinds) -> tuple[dict, int]:
  """-> ({kind: source} for `kinds`, the base source's length)."""
  base = data.examples_from
  if base == "shapesworld":
    world = shapesworld.from_config(data, split)
    return {k: ShapesWorldExamples(world, k, data.shapes_seed) for k in kinds}, len(world)
  if base == "folder":
    src = CaptionFolder(data.dir, data.image_size)
  elif base == "tfds":
    src = TfdsSource(data.tfds_name, data.data_dir, split, image_key=data.tfds_image_key,
                     caption_key=data.tfds_caption_key)
  else:
    raise UserError(f"data.examples_from={base!r}: expected one of {BASES}")
  return {k: CaptionExamples(src, k, data.caption_question) for k in kinds}, len(src)


def build_source(data: ml_collections.ConfigDict, split: str):
  """The Pretzel example source of `data` (`default_data_config()`) for a split, before packing (what
  `pipeline.build_source` packs by data.pack for data.name = "pretzel")."""
  if int(data.channels) != 3:
    raise UserError(f"data.channels={data.channels}: Pretzel examples are RGB, set data.channels=3")
  if data.flip and data.examples_from == "shapesworld":
    raise UserError("data.flip=True would mirror ShapesWorld images whose texts say left and right: "
                    "set data.flip=False")
  weights = _check_weights(data.mixture)
  sources, n = kind_sources(data, split, sorted(weights))
  size = int(data.mixture_size) if split == data.train_split else 0
  return Mixture(sources, weights, size or n, data.mixture_seed)
