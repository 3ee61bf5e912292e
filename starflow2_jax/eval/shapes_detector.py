"""ShapesWorld detector: from an RGB image, the objects' colours, kinds, sizes and positions.

Method (built on the renderer of `data.shapesworld`: plain background, flat palette colours, shapes whose
bounding boxes never overlap):
  1. Every pixel p is explained as a blend of the background and one palette colour c,
     p ~ bg + alpha (c - bg): for each colour, alpha is the clipped projection on that segment and the
     residual the distance to it; the pixel takes the colour of least residual and its alpha. A blurred
     or antialiased edge is such a blend, so edges keep their colour; noise moves p off the segment
     equally for every colour.
  2. Pixels with alpha >= 1/2 form per-colour masks; their 4-connected components are objects
     (components under `MIN_AREA` of the smallest shape are noise and dropped).
  3. Each object's soft coverage (alpha inside a window around the component) is compared with every
     (kind, size) template: the shape rasterised by the renderer's geometry at the object's centre
     (from the coverage centroid: for a triangle the box centre lies r/3 above it), box-filtered from
     `SUPERSAMPLE`x. The template of least squared error gives kind and size.
  4. Positions are the box centres in [0, 1] (x right, y down, as the dataset's scenes); relations
     between objects follow the dataset's own rule (`data.shapesworld.relation`).

Scores (for `launch.evaluate --metric=shapes|qa` and the demo):
  `parse_caption(caption)` inverts the caption grammar; `score_caption(caption, detections)` ->
  {"colour", "kind", "size", "count", "relation", "position", "all"} (True/False, None where the
  caption says nothing about it); `prompt_following(rows)` aggregates accuracies per attribute, overall,
  for single-object captions and for excluded (colour, kind) combinations; `qa_accuracy(rows)` gives QA
  accuracy by question type (count, colour, kind).
"""
from __future__ import annotations

import itertools
import re
from collections import Counter

import numpy as np
from scipy import ndimage

from starflow2_jax.data import shapesworld as sw
from starflow2_jax.errors import UserError

SUPERSAMPLE = 4  # template rasterisation (the renderer draws at 4x too)
ALPHA_ON = 0.5  # a pixel belongs to an object when it is at least half the object's colour
MIN_AREA = 0.3  # components below this fraction of the smallest shape's area are noise
EDGE_PIXELS = 2  # blended edge pixels (antialiasing, blur) counted with an object around its core
# A one-object fit whose squared error exceeds this fraction of the coverage mass may be two touching
# objects of one colour (single objects stay under 0.06 even blurred and noised; touching pairs ~0.4).
SPLIT_TRIGGER = 0.15
SPLIT_GAIN = 0.5  # two fits replace one when they at least halve the squared coverage error
# Template blurs (Gaussian sigma in pixels of a REFERENCE_SIDE image, scaled with the side): sharp
# renders, and the softness of blurred or generated ones.
BLURS = (0.0, 0.7, 1.4)
REFERENCE_SIDE = 32
_PALETTE = np.asarray(list(sw.COLOURS.values()), np.float64)  # [K, 3]
_NAMES = tuple(sw.COLOURS)
_BG = np.asarray(sw.BACKGROUND, np.float64)
_CROSS_HALF_WIDTH = 1 / 2.5  # the cross bars' half-width over r, as the renderer draws them


def colour_alpha(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """uint8/float [S, S, 3] (0..255) -> (colour index [S, S] int, alpha [S, S] in [0, 1])."""
  p = np.asarray(image, np.float64)[..., None, :] - _BG  # [S, S, 1, 3]
  d = _PALETTE - _BG  # [K, 3]
  alpha = np.clip(np.sum(p * d, -1) / np.sum(d * d, -1), 0.0, 1.0)  # [S, S, K]
  residual = np.sum(np.square(p - alpha[..., None] * d), -1)
  best = np.argmin(residual, -1)
  return best, np.take_along_axis(alpha, best[..., None], -1)[..., 0]


def _inside(kind: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  """Indicator of the renderer's shape `kind` of half-extent r at offsets (dx, dy) from its centre."""
  if kind == "circle":
    return dx * dx + dy * dy <= r * r
  if kind == "square":
    return (np.abs(dx) <= r) & (np.abs(dy) <= r)
  if kind == "triangle":  # apex (0, -r), base from (-r, r) to (r, r)
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
  w = r * _CROSS_HALF_WIDTH
  return ((np.abs(dx) <= r) & (np.abs(dy) <= w)) | ((np.abs(dx) <= w) & (np.abs(dy) <= r))


def template(kind: str, size: str, cx: float, cy: float, rows: np.ndarray, cols: np.ndarray,
             side: int) -> np.ndarray:
  """Coverage [len(rows), len(cols)] of the shape centred at (cx, cy) (fractions of the side) over the
  given pixel rows and columns of a side x side image."""
  sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
  ys = ((rows[:, None] + sub[None]).reshape(-1) / side) - cy
  xs = ((cols[:, None] + sub[None]).reshape(-1) / side) - cx
  mask = _inside(kind, xs[None, :], ys[:, None], sw.SIZES[size] / 2).astype(np.float64)
  return mask.reshape(len(rows), SUPERSAMPLE, len(cols), SUPERSAMPLE).mean(axis=(1, 3))


def _centroid_offset(kind: str, size: str) -> float:
  """Coverage centroid minus box centre along y (fractions of the side): r/3 for the triangle."""
  return sw.SIZES[size] / 6 if kind == "triangle" else 0.0


def _fit(weights: np.ndarray, rows: np.ndarray, cols: np.ndarray, side: int) -> dict:
  """Best (kind, size) template for the soft coverage `weights` [rows, cols] of one object:
  {"kind", "size", "x", "y", "fit" [rows, cols], "error"}."""
  mass = weights.sum()
  gy = ((weights.sum(1) @ (rows + 0.5)) / mass) / side
  gx = ((weights.sum(0) @ (cols + 0.5)) / mass) / side
  best = None
  for kind in sw.KINDS:
    for size in sw.SIZES:
      cy = gy - _centroid_offset(kind, size)
      sharp = template(kind, size, gx, cy, rows, cols, side)
      for blur in BLURS:
        fit = ndimage.gaussian_filter(sharp, blur * side / REFERENCE_SIDE, mode="constant") if blur else sharp
        error = float(np.sum(np.square(weights - fit)))
        if best is None or error < best["error"]:
          best = {"kind": kind, "size": size, "x": float(gx), "y": float(cy), "fit": fit, "error": error}
  return best


def _split_fit(weights: np.ndarray, rows: np.ndarray, cols: np.ndarray, side: int,
               min_pixels: float) -> list[dict] | None:
  """Two objects of one colour whose blends touch: their boxes never overlap, so a horizontal or vertical
  line separates them. The cut (of every row and column boundary) whose two independent fits explain
  the coverage best; None when no cut leaves two objects of at least `min_pixels`."""
  best, best_error = None, np.inf
  for axis in (0, 1):
    for k in range(1, weights.shape[axis]):
      first = np.arange(weights.shape[axis]) < k
      first = first[:, None] if axis == 0 else first[None, :]
      parts = [np.where(first, weights, 0.0), np.where(first, 0.0, weights)]
      if min(part.sum() for part in parts) < min_pixels:
        continue
      fits = [_fit(part, rows, cols, side) for part in parts]
      error = float(np.sum(np.square(weights - fits[0]["fit"] - fits[1]["fit"])))
      if error < best_error:
        best, best_error = fits, error
  return best


def detect(image: np.ndarray) -> list[dict]:
  """uint8 [S, S, 3] -> [{"colour", "kind", "size", "x", "y"}] (x, y box centres in [0, 1]), ordered
  by position (top to bottom, then left to right)."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] != image.shape[1]:
    raise UserError(f"the ShapesWorld detector reads square RGB images [S, S, 3], found shape "
                    f"{list(image.shape)}")
  side = image.shape[0]
  colour, alpha = colour_alpha(image)
  min_pixels = MIN_AREA * (np.pi / 4) * (min(sw.SIZES.values()) * side) ** 2
  found = []
  for k, name in enumerate(_NAMES):
    labels, count = ndimage.label((colour == k) & (alpha >= ALPHA_ON))
    for lab in range(1, count + 1):
      component = labels == lab
      if component.sum() < min_pixels:
        continue
      # the object's soft coverage: its component and the blended edge pixels of its colour around it
      near = ndimage.binary_dilation(component, iterations=EDGE_PIXELS) & (colour == k)
      ys, xs = np.nonzero(near)
      rows, cols = np.arange(ys.min(), ys.max() + 1), np.arange(xs.min(), xs.max() + 1)
      weights = np.where(near, alpha, 0.0)[np.ix_(rows, cols)]
      fits = [_fit(weights, rows, cols, side)]
      if fits[0]["error"] > SPLIT_TRIGGER * weights.sum():
        split = _split_fit(weights, rows, cols, side, min_pixels)
        if split is not None and np.sum(np.square(weights - split[0]["fit"] - split[1]["fit"])) < (
            SPLIT_GAIN * fits[0]["error"]):
          fits = split
      found += [{"colour": name, "kind": f["kind"], "size": f["size"], "x": f["x"], "y": f["y"]}
                for f in fits]
  return sorted(found, key=lambda o: (round(o["y"], 2), o["x"]))


def relation(a: dict, b: dict) -> str:
  """The dataset's spatial relation of object a to object b ("above", "to the left of", ...)."""
  return sw.relation(a, b)


# -- captions and scores -----------------------------------------------------------------------------
_COLOUR = "|".join(sw.COLOURS)
_KIND = "|".join(sw.KINDS)
_SIZE = "|".join(sw.SIZES)
_CELL = "|".join(sorted(sw.CELLS, key=len, reverse=True))  # "top left" before "top"
_RELATIONS = ("to the left of", "to the right of", "above", "below")
_OBJ = rf"a (?:({_SIZE}) )?({_COLOUR}) ({_KIND})(?: at the ({_CELL}))?"  # groups: size, colour, kind, cell
_CAPTIONS = (
    (re.compile(rf"^{_OBJ}$"), 1),
    (re.compile(rf"^{_OBJ} ({'|'.join(_RELATIONS)}) {_OBJ}$"), 2),
    (re.compile(rf"^{_OBJ}, {_OBJ} and {_OBJ}$"), 3),
)
ATTRIBUTES = ("colour", "kind", "size", "count", "relation", "position", "all")


def parse_caption(caption: str) -> dict:
  """A ShapesWorld caption -> {"objects": [{"colour", "kind", "size", "cell"}] (size and cell None where
  the caption names none), "relation": str or None} (the relation of the first object to the second)."""
  text = caption.strip().lower()
  for pattern, n in _CAPTIONS:
    m = pattern.match(text)
    if not m or (n == 1) != (m.group(1) is not None):  # a size in single-object captions only
      continue
    g = list(m.groups())
    relation_ = g.pop(4) if n == 2 else None
    objects = [dict(zip(("size", "colour", "kind", "cell"), g[4 * i:4 * i + 4])) for i in range(n)]
    if len({o["cell"] is None for o in objects}) > 1 or any(o["size"] for o in objects[1:]):
      continue
    return {"objects": objects, "relation": relation_}
  raise UserError(f"caption {caption!r} is not in the ShapesWorld grammar (\"a small red circle\", "
                  "\"a red circle above a blue square\", \"a red circle, a blue square and a green "
                  "cross\", each shape optionally \"... at the top left\")")


def score_caption(caption: str, detections: list[dict]) -> dict:
  """Per-attribute correctness of the detected objects against the caption (None: not applicable).

  colour / kind: the multisets of colours / kinds agree; size: the one object's size (single-object
  captions); count: the number of objects; relation: two objects of the caption's (colour, kind) are
  found in the caption's relation (two-object captions); position: each object of the caption has a
  detection of its (colour, kind) in its grid cell (`data.shapesworld.cell_of`; captions naming cells);
  all: the (colour, kind) multisets agree and every applicable attribute is right."""
  parsed = parse_caption(caption)
  want = parsed["objects"]
  gridded = want[0]["cell"] is not None
  if gridded:  # relations between cells, as the grid layout's captions state them
    detections = [{**d, "cell": sw.cell_of(d["x"], d["y"])} for d in detections]
  same = lambda key: Counter(o[key] for o in want) == Counter(d[key] for d in detections)
  pairs = Counter((o["colour"], o["kind"]) for o in want) == Counter(
      (d["colour"], d["kind"]) for d in detections)
  size = None
  if want[0]["size"] is not None:
    size = len(detections) == 1 and detections[0]["size"] == want[0]["size"]
  rel = None
  if parsed["relation"] is not None:
    rel = any(relation(a, b) == parsed["relation"]
              for a, b in itertools.permutations(detections, 2)
              if (a["colour"], a["kind"]) == (want[0]["colour"], want[0]["kind"])
              and (b["colour"], b["kind"]) == (want[1]["colour"], want[1]["kind"]))
  position = None
  if gridded:
    position = all(any((d["colour"], d["kind"], d["cell"]) == (o["colour"], o["kind"], o["cell"])
                       for d in detections) for o in want)
  scores = {"colour": same("colour"), "kind": same("kind"), "size": size,
            "count": len(detections) == len(want), "relation": rel, "position": position}
  scores["all"] = pairs and all(v for v in scores.values() if v is not None)
  return scores


def _accuracies(score_rows: list[dict]) -> dict:
  out = {}
  for a in ATTRIBUTES:
    vals = [s[a] for s in score_rows if s[a] is not None]
    out[a] = float(np.mean(vals)) if vals else None
  out["num"] = len(score_rows)
  return out


def prompt_following(rows: list[dict]) -> dict:
  """rows: [{"caption", "detections", "excluded_combination" (bool, optional)}] -> accuracies per
  attribute for "overall", "single_object", "single_object_trained" (single-object rows not of an
  excluded combination) and "excluded_combination" rows."""
  scored = [(score_caption(r["caption"], r["detections"]),  # (scores, single object, excluded)
             len(parse_caption(r["caption"])["objects"]) == 1, bool(r.get("excluded_combination", False)))
            for r in rows]
  groups = {"overall": [s for s, _, _ in scored],
            "single_object": [s for s, one, _ in scored if one],
            "single_object_trained": [s for s, one, ex in scored if one and not ex],
            "excluded_combination": [s for s, _, ex in scored if ex]}
  return {name: _accuracies(group) for name, group in groups.items()}


def question_type(question: str) -> str:
  """"count", "colour" or "kind" for the dataset's question forms."""
  q = question.strip().lower()
  if q.startswith("how many"):
    return "count"
  if q.startswith("what colour"):
    return "colour"
  if q.startswith("what shape"):
    return "kind"
  raise UserError(f"question {question!r} is not a ShapesWorld question (\"how many shapes are there?\", "
                  "\"what colour is the circle?\", \"what shape is red?\")")


def normalise_answer(text: str) -> str:
  """Lower case, surrounding spaces and a final full stop removed."""
  return text.strip().lower().rstrip(".").strip()


def qa_accuracy(rows: list[dict]) -> dict:
  """rows: [{"question", "answer", "prediction"}] -> {type: accuracy, "overall": accuracy, "num"}."""
  by_type: dict[str, list[bool]] = {}
  for r in rows:
    ok = normalise_answer(r["prediction"]) == normalise_answer(r["answer"])
    by_type.setdefault(question_type(r["question"]), []).append(ok)
  out = {t: float(np.mean(v)) for t, v in sorted(by_type.items())}
  out["overall"] = float(np.mean([x for v in by_type.values() for x in v])) if rows else None
  out["num"] = len(rows)
  return out
