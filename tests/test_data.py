"""Datasets and the grain pipeline (47): determinism, per-process shards, iterator restore, errors."""
import json

import numpy as np
import pytest
from absl import flags
from PIL import Image

from starflow2_jax.data import digits, pipeline, shapesworld
from starflow2_jax.data.folder import FolderSource
from starflow2_jax.data.tfds_source import TfdsSource, write_tfds_dataset


class ListSource:
  """N small records with an asymmetric first row (to see flips)."""

  def __init__(self, n, size=4):
    self.n, self.size = n, size

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    img = np.zeros((self.size, self.size, 1), np.uint8)
    img[0, :, 0] = np.arange(self.size)  # asymmetric, to see flips
    return {"image": img, "label": np.int32(i % 10)}


class Fields:
  """A picklable record transform (as a task supplies): image and label."""

  def __call__(self, r):
    return {"image": r["image"], "label": np.int32(r["label"])}


class Text:
  """A transform that turns the record's text into fixed-size arrays (as a tokenizer would): the UTF-8
  bytes of the caption and of every question and answer, zero-padded to TEXT_LEN."""

  def __call__(self, r):
    qa = " | ".join(f"{q} -> {a}" for q, a in zip(r.get("questions", []), r.get("answers", [])))
    return {"caption": _encode(r["caption"]), "qa": _encode(qa), "image": r["image"]}


TEXT_LEN = 256


def _encode(text):
  b = np.frombuffer(text.encode(), np.uint8)
  assert len(b) <= TEXT_LEN
  return np.pad(b, (0, TEXT_LEN - len(b)))


def _decode(a):
  return bytes(a[a != 0]).decode()


def _cfg(**kw):
  c = pipeline.default_data_config()
  c.image_size, c.channels = 4, 1
  for k, v in kw.items():
    c[k] = v
  return c


def test_digits_splits():
  tr, te = digits.DigitsSource("train", 16, 3), digits.DigitsSource("test", 16, 3)
  assert len(tr) == 1500 and len(te) == digits.NUM_TEST
  r = tr[0]
  assert r["image"].shape == (16, 16, 3) and r["image"].dtype == np.uint8 and 0 <= r["label"] < 10
  assert set(np.unique(te.labels)) == set(range(10))


def test_shapesworld_is_deterministic_with_captions_and_answers():
  a = shapesworld.ShapesWorldSource("train", 32, 50, seed=3)
  b = shapesworld.ShapesWorldSource("train", 32, 50, seed=3)
  for i in (0, 7, 49):
    ra, rb = a[i], b[i]
    assert np.array_equal(ra["image"], rb["image"]) and ra["caption"] == rb["caption"]
    assert ra["image"].shape == (32, 32, 3)
    shapes = a.scene(i)
    assert ra["caption"].startswith("a ")
    for s in shapes:
      assert s["colour"] in ra["caption"] and s["kind"] in ra["caption"]
    qa = dict(zip(ra["questions"], ra["answers"]))
    assert qa["how many shapes are there?"] == shapesworld.NUMBERS[len(shapes)]
    for s in shapes:
      if f"what colour is the {s['kind']}?" in qa:
        assert qa[f"what colour is the {s['kind']}?"] == s["colour"]
  assert not np.array_equal(a[0]["image"], shapesworld.ShapesWorldSource("test", 32, 50, seed=3)[0]["image"])
  two = next(a.scene(i) for i in range(50) if len(a.scene(i)) == 2)
  rel = shapesworld.ShapesWorldSource.caption(two)
  assert any(w in rel for w in ("above", "below", "to the left of", "to the right of"))


def test_shapesworld_grid_layout_puts_each_shape_in_the_cell_its_caption_names():
  src = shapesworld.ShapesWorldSource("train", 32, 200, seed=1, layout="grid")
  for i in range(200):
    shapes = src.scene(i)
    cells = [s["cell"] for s in shapes]
    assert len(set(cells)) == len(cells)
    for s in shapes:
      col, row = shapesworld.CELLS[s["cell"]]
      r = shapesworld.SIZES[s["size"]] / 2
      for v, c in ((s["x"], col), (s["y"], row)):
        assert abs(v - shapesworld.GRID_CENTRES[c]) <= shapesworld.GRID_JITTER
        assert r <= v + 1e-9 and v <= 1 - r + 1e-9  # inside the image
      assert shapesworld.cell_of(s["x"], s["y"]) == s["cell"]
    caption = src.caption(shapes)
    assert all(shapesworld.describe(s, sized=len(shapes) == 1) in caption for s in shapes)
  one = {"colour": "red", "kind": "circle", "size": "large", "cell": "top left"}
  assert shapesworld.ShapesWorldSource.caption([one]) == "a large red circle at the top left"
  # relations of cells: the diagonal neighbour below-right is "to the left of" (columns first)
  two = [one, {"colour": "blue", "kind": "cross", "size": "small", "cell": "centre"}]
  assert shapesworld.relation(*two) == "to the left of"
  assert shapesworld.relation(two[1], {**one, "cell": "top"}) == "below"
  with pytest.raises(ValueError, match="layout must be one of"):
    shapesworld.ShapesWorldSource("train", 16, 10, layout="spiral")


def test_shapesworld_scene_map_names_each_cell_by_the_shape_covering_most_of_it():
  """Against coverage counted on a fine lattice of points: a cell names the shape whose box covers the
  most of it when that is at least MAP_COVER, else <|empty|>; every shape names the cell of its centre."""
  src = shapesworld.ShapesWorldSource("train", 32, 60, seed=2, layout="grid")
  grid, fine = 4, 40
  t = (np.arange(fine) + 0.5) / fine / grid  # lattice offsets inside one cell
  for i in range(60):
    shapes = src.scene(i)
    words = shapesworld.scene_map(shapes, grid)
    assert len(words) == grid * grid and set(words) <= set(shapesworld.MAP_WORDS)
    for cell, word in enumerate(words):
      ys, xs = np.meshgrid(cell // grid / grid + t, cell % grid / grid + t, indexing="ij")
      cover = [np.mean((np.abs(xs - s["x"]) <= shapesworld.SIZES[s["size"]] / 2)
                       & (np.abs(ys - s["y"]) <= shapesworld.SIZES[s["size"]] / 2)) for s in shapes]
      k = int(np.argmax(cover))
      if cover[k] >= shapesworld.MAP_COVER + 0.03:
        s = shapes[k]
        assert word == f"<|{s['size']} {s['colour']} {s['kind']}|>"
      elif cover[k] < shapesworld.MAP_COVER - 0.03:
        assert word == shapesworld.MAP_EMPTY
    for s in shapes:
      word = f"<|{s['size']} {s['colour']} {s['kind']}|>"
      assert words[int(s["y"] * grid) * grid + int(s["x"] * grid)] == word
  one = {"colour": "red", "kind": "circle", "size": "small", "x": 0.21, "y": 0.21}
  assert shapesworld.scene_map([one], 2) == ["<|small red circle|>"] + [shapesworld.MAP_EMPTY] * 3
  assert shapesworld.scene_map([], 2) == [shapesworld.MAP_EMPTY] * 4
  assert len(set(shapesworld.MAP_WORDS)) == 1 + len(shapesworld.SIZES) * len(shapesworld.COLOURS) * len(
      shapesworld.KINDS)
  assert src[0]["shapes"] == src.scene(0)
  with pytest.raises(ValueError, match="positive grid side"):
    shapesworld.scene_map([one], 0)


def test_shapesworld_excluded_combinations_only_in_heldout_split():
  ex = [("red", "circle"), ("blue", "square")]
  tr = shapesworld.ShapesWorldSource("train", 16, 300, exclude=ex)
  te = shapesworld.ShapesWorldSource("test", 16, 300, exclude=ex)
  combos = lambda src: {(s["colour"], s["kind"]) for i in range(len(src)) for s in src.scene(i)}  # noqa: E731
  assert not combos(tr) & set(ex)
  assert combos(te) & set(ex)
  with pytest.raises(ValueError, match="exclude entry"):
    shapesworld.ShapesWorldSource("train", 16, 10, exclude=[("pink", "circle")])


def _indices(batch):
  return batch["index"].astype(int).tolist()


def test_order_is_deterministic_and_seeded():
  src = ListSource(20)
  it1, it2 = (pipeline.train_iterator(_cfg(), src, 4, 1, Fields()) for _ in range(2))
  b1, b2 = [_indices(next(it1)) for _ in range(10)], [_indices(next(it2)) for _ in range(10)]
  assert b1 == b2
  it3 = pipeline.train_iterator(_cfg(), src, 4, 2, Fields())
  assert [_indices(next(it3)) for _ in range(10)] != b1
  flat = sum(b1, [])
  assert sorted(flat[:20]) == list(range(20)) and sorted(flat[20:]) == list(range(20))  # epochs
  assert flat[:20] != flat[20:]  # reshuffled per epoch


def test_process_shards_are_disjoint_and_cover_the_global_batch():
  src = ListSource(24)
  single = pipeline.train_iterator(_cfg(flip=True), src, 8, 0, Fields())
  procs = [pipeline.train_iterator(_cfg(flip=True), src, 8, 0, Fields(), process_index=p,
                                   process_count=2)
           for p in range(2)]
  for _ in range(3):  # one epoch
    g = next(single)
    parts = [next(it) for it in procs]
    assert _indices(parts[0]) + _indices(parts[1]) == _indices(g)
    assert not set(_indices(parts[0])) & set(_indices(parts[1]))
    assert np.array_equal(np.concatenate([p["image"] for p in parts]), g["image"])  # flips too


def test_iterator_state_restores_the_next_batch():
  src = ListSource(20)
  it = pipeline.train_iterator(_cfg(flip=True), src, 4, 5, Fields())
  for _ in range(7):
    next(it)
  state = it.get_state()
  want = next(it)
  it2 = pipeline.train_iterator(_cfg(flip=True), src, 4, 5, Fields())
  it2.set_state(state)
  got = next(it2)
  for k in want:
    assert np.array_equal(want[k], got[k])
  assert state == pipeline.iterator_state(7)  # the position is the step, whatever the process count


def test_flip_is_applied_to_about_half():
  src = ListSource(200)
  b = next(pipeline.train_iterator(_cfg(flip=True), src, 200, 0, Fields()))
  flipped = b["image"][:, 0, 0, 0] == 3
  assert 60 < flipped.sum() < 140


def test_wrong_image_size_is_a_clear_error():
  it = pipeline.train_iterator(_cfg(image_size=8), ListSource(10), 2, 0, Fields())
  with pytest.raises(ValueError, match=r"image shape \(4, 4, 1\), expected \(8, 8, 1\)"):
    next(it)


def test_folder_source(tmp_path):
  for i, size in enumerate((8, 8, 6)):
    Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
  with open(tmp_path / "captions.jsonl", "w") as f:
    for i in range(3):
      f.write(json.dumps({"image": f"{i}.png", "caption": f"image {i}", "label": i}) + "\n")
  src = FolderSource(str(tmp_path), 8, 3)
  assert len(src) == 3 and src[1]["caption"] == "image 1" and src[1]["image"][0, 0, 0] == 40
  with pytest.raises(ValueError, match=r"2.png: image is 6x6, expected 8x8"):
    src[2]
  with pytest.raises(FileNotFoundError, match="captions.jsonl"):
    FolderSource(str(tmp_path / "nowhere"), 8)


@pytest.fixture
def parsed_flags():
  """grain's worker processes read absl flags: parse them for the test, unparse afterwards."""
  flags.FLAGS(["test_data"])
  yield
  flags.FLAGS.unparse_flags()


def test_captions_and_qa_reach_the_task_transform(tmp_path, parsed_flags):
  """ShapesWorld records (captions, questions, answers) and a caption folder's records flow through
  the training iterator (in grain worker processes too: the transform is pickled) and the held-out
  batches to the task's transform, untouched."""
  src = shapesworld.ShapesWorldSource("train", 8, 12, seed=1)
  for workers in (0, 1):
    it = pipeline.train_iterator(_cfg(image_size=8, channels=3, worker_count=workers), src, 4, 0, Text())
    for _ in range(3):
      b = next(it)
      for row, i in enumerate(_indices(b)):
        r = src[i]
        assert _decode(b["caption"][row]) == r["caption"]
        assert _decode(b["qa"][row]).split(" | ") == [f"{q} -> {a}" for q, a in
                                                      zip(r["questions"], r["answers"])]
        assert np.array_equal(b["image"][row], r["image"])
  held = list(pipeline.eval_batches(_cfg(image_size=8, channels=3), src, 5, Text(), limit=7))
  assert [len(b["caption"]) for b in held] == [5, 2] and "index" not in held[0]
  assert [_decode(c) for b in held for c in b["caption"]] == [src[i]["caption"] for i in range(7)]
  for i in range(2):
    Image.fromarray(np.full((4, 4, 1), 9 * i, np.uint8)[..., 0]).save(tmp_path / f"{i}.png")
  with open(tmp_path / "captions.jsonl", "w") as f:
    for i in range(2):
      f.write(json.dumps({"image": f"{i}.png", "caption": f"a grey square number {i}"}) + "\n")
  folder = FolderSource(str(tmp_path), 4, 1)
  b = next(pipeline.train_iterator(_cfg(), folder, 2, 0, Text()))
  assert sorted(_decode(c) for c in b["caption"]) == ["a grey square number 0", "a grey square number 1"]


def test_tfds_writer_and_source_round_trip(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  src = shapesworld.ShapesWorldSource("train", 8, 6)
  write_tfds_dataset("shapes_tiny", str(tmp_path), {"train": src}, (8, 8, 3), num_classes=4,
                     with_captions=True)
  back = TfdsSource("shapes_tiny", str(tmp_path), "train")
  assert len(back) == 6
  got = {back[i]["caption"]: back[i] for i in range(6)}  # tfds shuffles the write order
  for i in range(6):
    r = src[i]
    assert np.array_equal(got[r["caption"]]["image"], r["image"])
    assert got[r["caption"]]["label"] == r["label"]
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    write_tfds_dataset("shapes_tiny", str(tmp_path), {"train": src}, (8, 8, 3), num_classes=4)
  # a second dataset written in the same process (the builder class must not be registered globally)
  write_tfds_dataset("shapes_tiny2", str(tmp_path), {"train": src}, (8, 8, 3), num_classes=4)
  assert len(TfdsSource("shapes_tiny2", str(tmp_path), "train")) == 6


def test_tfds_missing_data_dir_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"data.data_dir=.*prepare the tfds dataset 'imagenet64'"):
    TfdsSource("imagenet64", str(tmp_path / "missing"), "train")
