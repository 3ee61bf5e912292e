"""ShapesWorld detector (issue 11 item 2): exact on 1,000 rendered test-split images of each layout
(colours, kinds, sizes, count, relations; grid cells), robust to blur and noise; caption parsing,
prompt-following and QA scores."""
import numpy as np
import pytest
from scipy import ndimage

from starflow2_jax.data.shapesworld import ShapesWorldSource, cell_of
from starflow2_jax.errors import UserError
from starflow2_jax.eval import shapes_detector as sd

SIDE = 32


def _key(o):
  return o["colour"], o["kind"], o["size"]


def _mismatches(source, images, scenes):
  """Indices where the detector misses an attribute, the count, a position (1/4 of a small shape)
  or a pairwise relation of the ground truth."""
  bad = []
  for i, (image, shapes) in enumerate(zip(images, scenes)):
    det = sd.detect(image)
    if sorted(map(_key, det)) != sorted(map(_key, shapes)):
      bad.append(i)
      continue
    by_pair = {(o["colour"], o["kind"]): o for o in det}
    found = [by_pair[(s["colour"], s["kind"])] for s in shapes]
    if shapes and "cell" in shapes[0]:  # the grid layout: relations of the detections' cells
      found = [{**f, "cell": cell_of(f["x"], f["y"])} for f in found]
    near = all(max(abs(f["x"] - s["x"]), abs(f["y"] - s["y"])) < 0.055 for f, s in zip(found, shapes))
    rel = all(sd.relation(found[a], found[b]) == sd.relation(shapes[a], shapes[b])
              for a in range(len(shapes)) for b in range(len(shapes)) if a != b)
    if not (near and rel):
      bad.append(i)
  return bad


@pytest.fixture(scope="module")
def rendered():
  source = ShapesWorldSource("test", image_size=SIDE, num_records=1000, seed=0)
  scenes = [source.scene(i) for i in range(len(source))]
  return source, scenes, [source.render(s) for s in scenes]


def test_exact_on_1000_rendered_images(rendered):
  source, scenes, images = rendered
  assert _mismatches(source, images, scenes) == []
  counts = np.bincount([len(s) for s in scenes])
  assert min(counts[1:]) > 50  # one, two and three objects all occur (measured 585, 324, 91)


def test_robust_to_blur_and_noise(rendered):
  source, scenes, images = rendered
  rng = np.random.default_rng(0)
  n = 300
  noisy = []
  for image in images[:n]:
    soft = ndimage.gaussian_filter(image.astype(np.float64), (0.6, 0.6, 0)) + rng.normal(0, 8, image.shape)
    noisy.append(np.clip(np.round(soft), 0, 255).astype(np.uint8))
  assert len(_mismatches(source, noisy, scenes[:n])) <= 1  # measured: 1 of 1,000 (a blurred small cross)


def test_a_larger_image_and_an_empty_one():
  source = ShapesWorldSource("test", image_size=64, num_records=20, seed=3)
  scenes = [source.scene(i) for i in range(20)]
  assert _mismatches(source, [source.render(s) for s in scenes], scenes) == []
  assert sd.detect(source.render([])) == []
  with pytest.raises(UserError, match=r"square RGB images \[S, S, 3\], found shape \[8, 9, 3\]"):
    sd.detect(np.zeros((8, 9, 3), np.uint8))


def test_caption_grammar_round_trips_the_dataset():
  source = ShapesWorldSource("train", image_size=SIDE, num_records=200, seed=1)
  for i in range(200):
    shapes = source.scene(i)
    parsed = sd.parse_caption(source.caption(shapes))
    assert [(o["colour"], o["kind"]) for o in parsed["objects"]] == [(s["colour"], s["kind"]) for s in shapes]
    assert parsed["relation"] == (sd.relation(shapes[0], shapes[1]) if len(shapes) == 2 else None)
    assert parsed["objects"][0]["size"] == (shapes[0]["size"] if len(shapes) == 1 else None)
  with pytest.raises(UserError, match="not in the ShapesWorld grammar"):
    sd.parse_caption("a red elephant")


def test_prompt_following_scores_each_attribute():
  red = {"colour": "red", "kind": "circle", "size": "small", "x": 0.2, "y": 0.5}
  blue = {"colour": "blue", "kind": "square", "size": "large", "x": 0.7, "y": 0.5}
  s = sd.score_caption("a red circle to the left of a blue square", [red, blue])
  assert s == {"colour": True, "kind": True, "size": None, "count": True, "relation": True,
               "position": None, "all": True}
  s = sd.score_caption("a red circle to the right of a blue square", [red, blue])
  assert s["relation"] is False and s["all"] is False and s["colour"] is True
  s = sd.score_caption("a large red circle", [red])
  assert s["size"] is False and s["kind"] is True and s["all"] is False
  s = sd.score_caption("a small red square", [red, blue])
  assert s["count"] is False and s["kind"] is False
  rows = [{"caption": "a small red circle", "detections": [red], "excluded_combination": True},
          {"caption": "a large red circle", "detections": [red]},
          {"caption": "a red circle to the left of a blue square", "detections": [red]}]
  acc = sd.prompt_following(rows)
  assert acc["overall"]["all"] == pytest.approx(1 / 3) and acc["overall"]["num"] == 3
  assert acc["single_object"]["size"] == 0.5 and acc["single_object"]["num"] == 2
  assert acc["single_object_trained"]["size"] == 0.0 and acc["single_object_trained"]["num"] == 1
  assert acc["excluded_combination"]["all"] == 1.0 and acc["excluded_combination"]["num"] == 1
  assert acc["overall"]["relation"] == 0.0


@pytest.fixture(scope="module")
def rendered_grid():
  source = ShapesWorldSource("test", image_size=SIDE, num_records=1000, seed=0, layout="grid")
  return source, [source[i] for i in range(len(source))]


def test_exact_on_1000_rendered_grid_images(rendered_grid):
  """Every caption of the grid layout (cells named) is all-correct for the detections of its image."""
  source, records = rendered_grid
  scenes = [source.scene(i) for i in range(len(source))]
  assert _mismatches(source, [r["image"] for r in records], scenes) == []
  wrong = [r["caption"] for r in records if not sd.score_caption(r["caption"], sd.detect(r["image"]))["all"]]
  assert wrong == []
  assert all(" at the " in r["caption"] for r in records)


def test_grid_captions_parse_and_score_the_cell():
  parsed = sd.parse_caption("a large red circle at the top left")
  assert parsed == {"objects": [{"size": "large", "colour": "red", "kind": "circle", "cell": "top left"}],
                    "relation": None}
  parsed = sd.parse_caption("a red circle at the top to the left of a blue square at the right")
  assert [o["cell"] for o in parsed["objects"]] == ["top", "right"]
  assert parsed["relation"] == "to the left of"
  three = sd.parse_caption("a red circle at the top, a blue square at the centre and a green cross at the "
                           "bottom right")
  assert [o["cell"] for o in three["objects"]] == ["top", "centre", "bottom right"]
  for bad in ("a red circle at the top left", "a large red circle at the middle",
              "a red circle at the top, a blue square and a green cross at the bottom"):
    with pytest.raises(UserError, match="not in the ShapesWorld grammar"):
      sd.parse_caption(bad)
  red = {"colour": "red", "kind": "circle", "size": "large", "x": 0.2, "y": 0.22}  # top left
  s = sd.score_caption("a large red circle at the top left", [red])
  assert s["position"] is True and s["all"] is True
  s = sd.score_caption("a large red circle at the bottom left", [red])
  assert s["position"] is False and s["colour"] is True and s["all"] is False
  # relations between cells: diagonal neighbours are left / right, as the dataset's captions say
  blue = {"colour": "blue", "kind": "square", "size": "small", "x": 0.52, "y": 0.47}  # centre
  s = sd.score_caption("a red circle at the top left to the left of a blue square at the centre", [red, blue])
  assert s["relation"] is True and s["all"] is True
  rows = [{"caption": "a large red circle at the top left", "detections": [red]},
          {"caption": "a large red circle at the top", "detections": [red]}]
  assert sd.prompt_following(rows)["single_object"]["position"] == 0.5


def test_qa_accuracy_by_question_type():
  rows = [{"question": "how many shapes are there?", "answer": "two", "prediction": "Two."},
          {"question": "what colour is the circle?", "answer": "red", "prediction": "blue"},
          {"question": "what colour is the cross?", "answer": "green", "prediction": " green"},
          {"question": "what shape is red?", "answer": "circle", "prediction": "circle"}]
  acc = sd.qa_accuracy(rows)
  assert acc == {"colour": 0.5, "count": 1.0, "kind": 1.0, "overall": 0.75, "num": 4}
  with pytest.raises(UserError, match="not a ShapesWorld question"):
    sd.qa_accuracy([{"question": "why?", "answer": "a", "prediction": "a"}])
