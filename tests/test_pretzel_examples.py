"""Pretzel example sources: ShapesWorld kinds, caption folders, tfds, the mixture, packing, and the
transform through the grain pipeline (real worker processes: the transform is pickled)."""
import json

import numpy as np
import pytest
from absl import flags
from PIL import Image

from starflow2_jax.data import pipeline
from starflow2_jax.data.shapesworld import ShapesWorldSource
from starflow2_jax.errors import UserError
from starflow2_jax.pretzel import examples as ex
from starflow2_jax.pretzel import sequence as sq
from starflow2_jax.pretzel import toy_tokenizer

SIZE = 16


@pytest.fixture(scope="module")
def world():
  return ShapesWorldSource("train", SIZE, 40, seed=2)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("toy") / "tokenizer.json")
  return toy_tokenizer.train_shapesworld_tokenizer(path, num_records=200)


def _data(**kw):
  d = ex.default_data_config()
  d.image_size, d.shapes_num_train, d.shapes_num_test, d.max_len, d.max_images = SIZE, 40, 10, 200, 3
  for k, v in kw.items():
    d[k] = v
  return d


def _spec(d):
  return sq.SequenceSpec.from_config(d, (2, 2))


def test_shapesworld_kinds(world):
  """Each kind's record is built from scene i of the world: the text matches the scene and every image
  is the render of the scene (or sub-scene) the text describes."""
  src = {k: ex.ShapesWorldExamples(world, k, seed=2) for k in ex.KINDS}
  for i in range(12):
    shapes, r = world.scene(i), world[i]
    t2i = src["text_to_image"][i]
    assert t2i["caption"] == r["caption"] and np.array_equal(t2i["images"][0], r["image"])
    qa = src["understanding"][i]
    pairs = dict(zip(r["questions"] + [ex.CAPTION_QUESTION], r["answers"] + [r["caption"]]))
    assert pairs[qa["question"]] == qa["answer"] and np.array_equal(qa["images"][0], r["image"])
    edit = src["editing"][i]
    source, target = edit["images"]
    if len(shapes) == 1:
      other = next(z for z in ("small", "large") if z != shapes[0]["size"])
      assert edit["instruction"] == f"make the {shapes[0]['colour']} {shapes[0]['kind']} {other}."
      assert np.array_equal(source, r["image"]) and not np.array_equal(target, r["image"])
    elif edit["instruction"].startswith("add"):
      assert np.array_equal(source, world.render(shapes[:-1])) and np.array_equal(target, r["image"])
    else:
      assert edit["instruction"] == f"remove the {shapes[-1]['colour']} {shapes[-1]['kind']}."
      assert np.array_equal(source, r["image"]) and np.array_equal(target, world.render(shapes[:-1]))
    doc = src["interleaved"][i]
    refs = [p for p in doc["parts"] if isinstance(p, int)]
    assert refs == list(range(len(doc["images"]))) and len(refs) >= 2
    text = "".join(p for p in doc["parts"] if isinstance(p, str))
    if len(shapes) > 1:  # one shape more per image; the last image is the whole scene
      assert len(refs) == len(shapes) and np.array_equal(doc["images"][-1], r["image"])
      assert all(s["colour"] in text and s["kind"] in text for s in shapes)
    else:
      assert np.array_equal(doc["images"][1], world[i + 1]["image"]) and world[i + 1]["caption"] in text
    assert src["interleaved"][i]["parts"] == doc["parts"]  # deterministic


def test_excluded_combinations_stay_out_of_every_training_kind():
  excl = [("red", "circle"), ("blue", "square")]
  train = ShapesWorldSource("train", SIZE, 150, exclude=excl)
  for kind in ("editing", "interleaved"):
    src = ex.ShapesWorldExamples(train, kind)
    for i in range(len(src)):
      _, scenes = src.text_record(i)
      assert not {(s["colour"], s["kind"]) for sc in scenes for s in sc} & set(excl)


def test_mixture_weights_and_packing():
  sources = {k: [{"kind": k, "n": n} for n in range(7)] for k in ("text_to_image", "understanding")}
  mix = ex.Mixture(sources, {"text_to_image": 3.0, "understanding": 1.0, "editing": 0.0}, 1000, seed=1)
  kinds = [mix[j]["kind"] for j in range(len(mix))]
  frac = kinds.count("text_to_image") / len(kinds)
  assert abs(frac - 0.75) < 0.05  # 3.6 sigma
  assert kinds == [mix[j]["kind"] for j in range(len(mix))]  # deterministic
  assert {mix[j]["n"] for j in range(len(mix))} == set(range(7))  # records drawn from the whole source
  assert kinds != [ex.Mixture(sources, mix.weights, 1000, seed=2)[j]["kind"] for j in range(1000)]
  with pytest.raises(UserError, match="data.mixture=.*non-negative weights"):
    ex.Mixture(sources, {"text_to_image": -1.0}, 10)
  with pytest.raises(UserError, match="data.mixture=.*non-negative weights"):
    ex.Mixture(sources, {"captions": 1.0}, 10)
  with pytest.raises(UserError, match=r"no source of them"):
    ex.Mixture(sources, {"editing": 1.0}, 10)
  packed = pipeline.Packed(mix, 3)
  assert len(packed) == 333
  assert [r["kind"] for r in packed[5][pipeline.RECORDS_KEY]] == kinds[15:18]


def test_caption_folder(tmp_path):
  """A folder of images with .txt captions (or captions.jsonl) gives text-to-image and captioning
  records through `pipeline.build_source`; the other kinds are refused."""
  folder = tmp_path / "pics"
  (folder / "sub").mkdir(parents=True)
  for i, name in enumerate(("b.png", "sub/a.png")):
    Image.fromarray(np.full((SIZE, SIZE, 3), 50 * i, np.uint8)).save(folder / name)
    (folder / name).with_suffix(".txt").write_text(f"picture {i}\n")
  Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(folder / "no_caption.png")
  d = _data(examples_from="folder", dir=str(folder), mixture={"text_to_image": 1.0})
  src = pipeline.build_source(d, "train")
  assert len(src) == 2
  for j in range(2):
    r = src[j]
    assert r["kind"] == "text_to_image" and r["images"][0][0, 0, 0] == 50 * int(r["caption"][-1])
  qa = ex.CaptionExamples(ex.CaptionFolder(str(folder), SIZE), "understanding", "what is it?")
  assert {(qa[j]["question"], qa[j]["answer"]) for j in range(2)} == {("what is it?", "picture 0"),
                                                                      ("what is it?", "picture 1")}
  with pytest.raises(UserError, match="image-caption data gives the kinds"):
    pipeline.build_source(_data(examples_from="folder", dir=str(folder), mixture={"editing": 1.0}), "train")
  (tmp_path / "jsonl").mkdir()
  Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(tmp_path / "jsonl" / "x.png")
  (tmp_path / "jsonl" / "captions.jsonl").write_text(json.dumps({"image": "x.png", "caption": "xx"}) + "\n")
  assert ex.CaptionFolder(str(tmp_path / "jsonl"), SIZE)[0]["caption"] == "xx"
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="found neither captions.jsonl nor images"):
    ex.CaptionFolder(str(tmp_path / "empty"), SIZE)


class FakeTfds:
  """Stands in for TfdsSource (whose array_record round trip test_data covers): records the arguments,
  serves ShapesWorld records with or without captions."""

  def __init__(self, name, data_dir, split, image_key="image", label_key="label", caption_key="caption"):
    self.args = (name, data_dir, split, image_key, caption_key)
    self.world = ShapesWorldSource(split, SIZE, 4)

  def __len__(self):
    return 4

  def __getitem__(self, i):
    r = self.world[i]
    return {"image": r["image"], **({"caption": r["caption"]} if self.args[4] == "caption" else {})}


def test_tfds_examples(monkeypatch):
  monkeypatch.setattr(ex, "TfdsSource", FakeTfds)
  d = _data(examples_from="tfds", tfds_name="mine", data_dir="/data", mixture={"understanding": 1.0},
            tfds_image_key="img")
  src = pipeline.build_source(d, "test")
  inner = src.sources["understanding"].source
  assert inner.args == ("mine", "/data", "test", "img", "caption")
  captions = {inner[i]["caption"] for i in range(4)}
  assert all(src[j]["answer"] in captions and src[j]["question"] == ex.CAPTION_QUESTION for j in range(4))
  src = pipeline.build_source(_data(**{**d.to_dict(), "tfds_caption_key": "text"}), "test")
  with pytest.raises(UserError, match="record .* has no caption"):
    src[0]


def test_bad_data_configs():
  with pytest.raises(UserError, match="data.channels=1: Pretzel examples are RGB"):
    pipeline.build_source(_data(channels=1), "train")
  with pytest.raises(UserError, match="data.flip=True would mirror"):
    pipeline.build_source(_data(flip=True), "train")
  with pytest.raises(UserError, match="data.examples_from='coco'"):
    pipeline.build_source(_data(examples_from="coco"), "train")


@pytest.fixture
def parsed_flags():
  """grain's worker processes read absl flags: parse them for the test, unparse afterwards."""
  flags.FLAGS(["test_pretzel_examples"])
  yield
  flags.FLAGS.unparse_flags()


def test_transform_in_grain_worker_processes(tok_path, parsed_flags):
  """Packed rows of every kind from `pipeline.build_source`, through the training iterator in a grain
  worker process (the transform pickled, the tokenizer loaded there) and in the main process: the same
  batches, caption dropout included; held-out batches have no dropout."""
  d = _data(mixture={k: 1.0 for k in ex.KINDS}, pack=2, caption_dropout=0.5, max_len=400, max_images=6)
  src = pipeline.build_source(d, "train")
  transform = sq.PretzelTransform(_spec(d), tok_path, seed=3)
  batches = {}
  for workers in (0, 1):
    it = pipeline.train_iterator(_data(**{**d.to_dict(), "worker_count": workers}), src, 4, 0, transform)
    batches[workers] = [next(it) for _ in range(2)]
  for b0, b1 in zip(*batches.values()):
    assert b0.keys() == b1.keys()
    for k in b0:
      np.testing.assert_array_equal(b0[k], b1[k])
  tk = transform.builder.tk
  dropped = []
  for step, b in enumerate(batches[0]):
    for row in range(4):
      records = src[int(b["index"][row])][pipeline.RECORDS_KEY]
      assert b["segment_ids"][row].max() == len(records) == 2  # everything fits
      for m, record in enumerate(records, 1):
        text = tk.decode(b["tokens"][row][b["segment_ids"][row] == m].tolist(), skip_special_tokens=False)
        user = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
        user_text = user.split("<|vision_end|>")[-1]
        draw = np.random.default_rng([3, step * 4 + row, 2, m - 1]).random() < 0.5
        drop = draw and record["kind"] in ("text_to_image", "editing", "interleaved")
        assert (user_text == "") == drop, (record["kind"], user)
        dropped.append(drop)
  assert any(dropped) and not all(dropped)
  held = next(pipeline.eval_batches(d, pipeline.build_source(d, "test"), 4, transform))
  assert held["tokens"].shape == (4, 400)
  nodrop = sq.PretzelTransform(_spec(_data(**{**d.to_dict(), "caption_dropout": 0.0})), tok_path)
  held_ref = next(pipeline.eval_batches(d, pipeline.build_source(d, "test"), 4, nodrop))
  np.testing.assert_array_equal(held["tokens"], held_ref["tokens"])
