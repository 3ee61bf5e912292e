"""ShapesWorld: a deterministic procedural text-image dataset (no download).

Each image shows 1-3 coloured shapes of several kinds and sizes on a plain background, with a caption
("a red circle above a blue square") and question-answer pairs ("what colour is the circle?" -> "red").
Record i of a split is a pure function of (seed, split, i, layout).

Layouts: "free" places each shape uniformly at random; "grid" puts each shape in its own cell of a 3 x 3
grid (centres `GRID_CENTRES`, jittered by up to `GRID_JITTER`) and the caption names the cell ("a large
red circle at the top left"), so that a caption determines its image up to the jitter: the layout of
the STARFlow2 demo. Chosen (colour, kind) combinations can be excluded from the training split
(rejection-sampled away) while the held-out split keeps them, to test compositional generalisation.

Record: {"image": uint8 [S, S, 3], "label": int32 (kind of the first shape), "caption": str,
         "questions": list[str], "answers": list[str], "shapes": the scene}
Scene: [{"colour", "kind", "size", "x", "y"}] (x right, y down, in [0, 1]), and "cell" in the grid layout.

Scene map (`scene_map`): the scene as one word per cell of a G x G token grid, in raster order: the
shape that covers most of the cell (`MAP_WORDS`: "<|size colour kind|>", "<|empty|>" where no shape's box
covers `MAP_COVER` of it), what a vision tower's per-patch tokens tell a language model; the demo's
text-only language model reads scenes so (train/lm_task.py, lm.scene = "map").
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
LAYOUTS = ("free", "grid")
# grid cells by (column, row); a caption says "at the <cell>"
CELLS = {"top left": (0, 0), "top": (1, 0), "top right": (2, 0), "left": (0, 1), "centre": (1, 1),
         "right": (2, 1), "bottom left": (0, 2), "bottom": (1, 2), "bottom right": (2, 2)}
GRID_CENTRES = (0.21, 0.5, 0.79)  # a large shape (extent 0.38) at an edge cell stays inside the image
GRID_JITTER = 0.02  # uniform offset of a shape from its cell centre, on each axis
MAP_COVER = 0.15  # a shape's box covering this fraction of a map cell names the cell
MAP_EMPTY = "<|empty|>"


def map_word(s: dict) -> str:
  """A shape's scene-map word: "<|large red circle|>"."""
  return f"<|{s['size']} {s['colour']} {s['kind']}|>"


MAP_WORDS = (MAP_EMPTY,) + tuple(map_word({"size": size, "colour": colour, "kind": kind})
                                 for size in SIZES for colour in COLOURS for kind in KINDS)
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


def cell_of(x: float, y: float) -> str:
  """The grid cell whose centre is nearest to (x, y)."""
  col, row = (int(np.argmin(np.abs(np.asarray(GRID_CENTRES) - v))) for v in (x, y))
  return next(name for name, cr in CELLS.items() if cr == (col, row))


def relation(a: dict, b: dict) -> str:
  """Where shape a is relative to shape b: "to the left of", "to the right of", "above" or "below"
  (of their cells where both have one: robust to the jitter; else of their centres)."""
  if "cell" in a and "cell" in b:
    (ca, ra), (cb, rb) = CELLS[a["cell"]], CELLS[b["cell"]]
    dx, dy = cb - ca, rb - ra
  else:
    dx, dy = b["x"] - a["x"], b["y"] - a["y"]
  if abs(dx) >= abs(dy):
    return "to the left of" if dx > 0 else "to the right of"
  return "above" if dy > 0 else "below"


def describe(s: dict, sized: bool = False) -> str:
  """A shape in words: "a red circle", sized "a large red circle"; in a grid cell "... at the top"."""
  size = f"{s['size']} " if sized else ""
  where = f" at the {s['cell']}" if "cell" in s else ""
  return f"a {size}{s['colour']} {s['kind']}{where}"


def scene_map(shapes: list[dict], grid: int) -> list[str]:
  """The scene's map (module docstring): grid * grid words of `MAP_WORDS`, row by row."""
  if grid < 1:
    raise UserError(f"a scene map needs a positive grid side, found {grid}")
  edges = np.arange(grid + 1) / grid
  cover = np.zeros((len(shapes), grid, grid))  # [shape, row, column]: fraction of the cell in its box
  for k, s in enumerate(shapes):
    r = SIZES[s["size"]] / 2
    ox, oy = (np.clip(np.minimum(edges[1:], v + r) - np.maximum(edges[:-1], v - r), 0, None) * grid
              for v in (s["x"], s["y"]))
    cover[k] = oy[:, None] * ox[None, :]
  best = np.argmax(cover, axis=0) if shapes else np.zeros((grid, grid), int)
  words = []
  for row in range(grid):
    for col in range(grid):
      s = shapes[best[row, col]] if shapes else None
      hit = s is not None and cover[best[row, col], row, col] >= MAP_COVER
      words.append(map_word(s) if hit else MAP_EMPTY)
  return words


class ShapesWorldSource:
  """Random-access source of ShapesWorld records.

  Args:
    split: "train" or "test".
    image_size: side S of the square images.
    num_records: length of the split.
    seed: dataset seed (the same seed gives the same dataset on every machine).
    exclude: (colour, kind) pairs, e.g. [("red", "circle")], never present in the train split.
    layout: "free" or "grid" (module docstring).
  """

  def __init__(self, split: str = "train", image_size: int = 32, num_records: int = 10000, seed: int = 0,
               exclude=(), layout: str = "free"):
    if split not in _SPLIT_IDS:
      raise UserError(f"shapesworld split must be one of {sorted(_SPLIT_IDS)}, found {split!r}")
    if layout not in LAYOUTS:
      raise UserError(f"shapesworld layout must be one of {LAYOUTS}, found {layout!r}")
    self.layout = layout
    self.exclude = {tuple(e) for e in exclude}
    for c, k in self.exclude:
      if c not in COLOURS or k not in KINDS:
        raise UserError(f"shapesworld exclude entry ({c!r}, {k!r}): colours are {sorted(COLOURS)}, "
                        f"kinds are {list(KINDS)}")
    self.split, self.image_size, self.num_records, self.seed = split, image_size, num_records, seed

  def __len__(self) -> int:
    return self.num_records

  def scene(self, i: int) -> list[dict]:
    """The shapes of record i (module docstring)."""
    if not 0 <= i < self.num_records:
      raise IndexError(f"shapesworld {self.split} has {self.num_records} records, asked for {i}")
    rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], i])
    colours, sizes = list(COLOURS), list(SIZES)
    for _ in range(_MAX_TRIES):
      n = int(rng.integers(1, 4))
      cells = list(rng.permutation(list(CELLS))[:n]) if self.layout == "grid" else [None] * n
      shapes = []
      for cell in cells:
        size = sizes[int(rng.integers(len(sizes)))]
        s = {"colour": colours[int(rng.integers(len(colours)))], "kind": KINDS[int(rng.integers(len(KINDS)))],
             "size": size}
        if cell is None:
          r = SIZES[size] / 2
          s.update(x=float(rng.uniform(r, 1 - r)), y=float(rng.uniform(r, 1 - r)))
        else:
          col, row = CELLS[cell]
          x, y = (GRID_CENTRES[c] + float(rng.uniform(-GRID_JITTER, GRID_JITTER)) for c in (col, row))
          s.update(x=x, y=y, cell=str(cell))
        shapes.append(s)
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
    if len(shapes) == 1:
      return describe(shapes[0], sized=True)
    if len(shapes) == 2:
      return f"{describe(shapes[0])} {relation(shapes[0], shapes[1])} {describe(shapes[1])}"
    return f"{describe(shapes[0])}, {describe(shapes[1])} and {describe(shapes[2])}"

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
            "caption": self.caption(shapes), "questions": qs, "answers": ans, "shapes": shapes}


def from_config(data, split: str) -> ShapesWorldSource:
  """The split of a data config's ShapesWorld (data.image_size, shapes_num_train / shapes_num_test,
  shapes_seed, shapes_exclude, shapes_layout)."""
  n = data.shapes_num_train if split == "train" else data.shapes_num_test
  return ShapesWorldSource(split, int(data.image_size), int(n), int(data.shapes_seed), data.shapes_exclude,
                           data.get("shapes_layout", "free"))
