"""ShapesWorld: a deterministic procedural text-image dataset (no download).

Each image shows 1-3 coloured shapes of several kinds and sizes on a plain background, with a caption
("a red circle above a blue square") and question-answer pairs ("what colour is the circle?" -> "red").
Record i of a split is a pure function of (seed, split, i). Chosen (colour, kind) combinations can be
excluded from the training split (rejection-sampled away) while the held-out split keeps them, to
test compositional generalisation.

Record: {"image": uint8 [S, S, 3], "label": int32 (kind of the first shape), "caption": str,
         "questions": list[str], "answers": list[str]}
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from starflow2_jax.errors import UserError

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40),
           "purple": (150, 60, 190), "orange": (240, 140, 30), "white": (245, 245, 245)}
KINDS = ("circle", "square", "triangle", "cross")
SIZES = {"small": 0.22, "large": 0.38}  # shape extent as a fraction of the image side
BACKGROUND = (90, 90, 90)
SUPERSAMPLE = 4  # drawn at 4x and downsampled (antialiasing)
NUMBERS = ("zero", "one", "two", "three")
_SPLIT_IDS = {"train": 0, "test": 1}
_MAX_TRIES = 1000


def _draw(d: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
  if kind == "circle":
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
  elif kind == "square":
    d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
  elif kind == "triangle":
    d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
  else:  # cross
    w = r / 2.5
    d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def relation(a: dict, b: dict) -> str:
  """Where shape a is relative to shape b: "to the left of", "to the right of", "above" or "below"."""
  dx, dy = b["x"] - a["x"], b["y"] - a["y"]
  if abs(dx) >= abs(dy):
    return "to the left of" if dx > 0 else "to the right of"
  return "above" if dy > 0 else "below"


class ShapesWorldSource:
  """Random-access source of ShapesWorld records.

  Args:
    split: "train" or "test".
    image_size: side S of the square images.
    num_records: length of the split.
    seed: dataset seed (the same seed gives the same dataset on every machine).
    exclude: (colour, kind) pairs, e.g. [("red", "circle")], never present in the train split.
  """

  def __init__(self, split: str = "train", image_size: int = 32, num_records: int = 10000, seed: int = 0,
               exclude=()):
    if split not in _SPLIT_IDS:
      raise UserError(f"shapesworld split must be one of {sorted(_SPLIT_IDS)}, found {split!r}")
    self.exclude = {tuple(e) for e in exclude}
    for c, k in self.exclude:
      if c not in COLOURS or k not in KINDS:
        raise UserError(f"shapesworld exclude entry ({c!r}, {k!r}): colours are {sorted(COLOURS)}, "
                        f"kinds are {list(KINDS)}")
    self.split, self.image_size, self.num_records, self.seed = split, image_size, num_records, seed

  def __len__(self) -> int:
    return self.num_records

  def scene(self, i: int) -> list[dict]:
    """The shapes of record i: [{"colour", "kind", "size", "x", "y"}] with x, y in [0, 1]."""
    if not 0 <= i < self.num_records:
      raise IndexError(f"shapesworld {self.split} has {self.num_records} records, asked for {i}")
    rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], i])
    colours, sizes = list(COLOURS), list(SIZES)
    for _ in range(_MAX_TRIES):
      n = int(rng.integers(1, 4))
      shapes = []
      for _ in range(n):
        size = sizes[int(rng.integers(len(sizes)))]
        r = SIZES[size] / 2
        shapes.append({"colour": colours[int(rng.integers(len(colours)))],
                       "kind": KINDS[int(rng.integers(len(KINDS)))], "size": size,
                       "x": float(rng.uniform(r, 1 - r)), "y": float(rng.uniform(r, 1 - r))})
      distinct = len({(s["colour"], s["kind"]) for s in shapes}) == n
      apart = all(max(abs(a["x"] - b["x"]), abs(a["y"] - b["y"])) > (SIZES[a["size"]] + SIZES[b["size"]]) / 2
                  for j, a in enumerate(shapes) for b in shapes[j + 1:])
      excluded = self.split == "train" and any((s["colour"], s["kind"]) in self.exclude for s in shapes)
      if distinct and apart and not excluded:
        return shapes
    raise RuntimeError(f"shapesworld: no valid scene for record {i} after {_MAX_TRIES} tries "
                       "(too many excluded combinations?)")

  @staticmethod
  def caption(shapes: list[dict]) -> str:
    def name(s):
      return f"a {s['colour']} {s['kind']}"
    if len(shapes) == 1:
      return f"a {shapes[0]['size']} {shapes[0]['colour']} {shapes[0]['kind']}"
    if len(shapes) == 2:
      return f"{name(shapes[0])} {relation(shapes[0], shapes[1])} {name(shapes[1])}"
    return f"{name(shapes[0])}, {name(shapes[1])} and {name(shapes[2])}"

  @staticmethod
  def qa(shapes: list[dict]) -> tuple[list[str], list[str]]:
    qs = ["how many shapes are there?"]
    ans = [NUMBERS[len(shapes)]]
    kinds = [s["kind"] for s in shapes]
    colours = [s["colour"] for s in shapes]
    for s in shapes:
      if kinds.count(s["kind"]) == 1:
        qs.append(f"what colour is the {s['kind']}?")
        ans.append(s["colour"])
      if colours.count(s["colour"]) == 1:
        qs.append(f"what shape is {s['colour']}?")
        ans.append(s["kind"])
    return qs, ans

  def render(self, shapes: list[dict]) -> np.ndarray:
    big = self.image_size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    d = ImageDraw.Draw(img)
    for s in shapes:
      _draw(d, s["kind"], s["x"] * big, s["y"] * big, SIZES[s["size"]] * big / 2, COLOURS[s["colour"]])
    return np.asarray(img.resize((self.image_size, self.image_size), Image.LANCZOS), dtype=np.uint8)

  def __getitem__(self, i: int) -> dict:
    shapes = self.scene(int(i))
    qs, ans = self.qa(shapes)
    return {"image": self.render(shapes), "label": np.int32(KINDS.index(shapes[0]["kind"])),
            "caption": self.caption(shapes), "questions": qs, "answers": ans}
