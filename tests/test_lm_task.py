"""The lm task (issue 11 item 1): chat rows of ShapesWorld scenes (as scene maps or captions, or as
images for a vision tower), token-level CE as (sum, count), held-out CE / accuracy, and the export that
the STARFlow2 task loads as its frozen VLM."""
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from starflow2_jax import parallel
from starflow2_jax.data import pipeline, shapesworld
from starflow2_jax.data.pipeline import ELEMENT_KEY
from starflow2_jax.data.shapesworld import ShapesWorldSource
from starflow2_jax.errors import UserError
from starflow2_jax.pretzel import toy_tokenizer
from starflow2_jax.pretzel.loss import text_ce
from starflow2_jax.train import lm_task, loop, tasks
from starflow2_jax.train.pretzel_task import frozen_vlm, tokenizer_path
from starflow2_jax.vlm.chat import load_vlm
from starflow2_jax.vlm.model import Qwen2_5_VL, QwenConfig
from starflow2_jax.vlm.tokenizer import load_tokenizer
from starflow2_jax.vlm.vision import preprocess_image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import lm_shapesworld, starflow2_shapesworld  # noqa: E402

WORLD = ShapesWorldSource("train", 8, 50)
NO_DOCUMENTS = np.array([1.0, 1.0, 1.0, 0.0]) / 3  # form weights (lm_task.FORMS) without "document"


@pytest.fixture(scope="module")
def rows():
  path = tokenizer_path("toy")
  return lm_task.ChatRows(path, lm_shapesworld.MAX_LEN, "You are a helpful assistant.",
                          np.ones(len(lm_task.FORMS)) / len(lm_task.FORMS), seed=0,
                          world=WORLD), load_tokenizer(path)


def _form(turns) -> str:
  user, assistant = turns[0][1], turns[1][1]
  if not isinstance(assistant[0], str) and len(assistant) == 1:
    return "draw"
  if len(assistant) > 1:
    return "document"
  return "caption" if user[1] == "describe the image." else "qa"


def test_rows_supervise_only_the_assistant_and_shift_the_targets(rows):
  transform, tk = rows
  ids = transform.ids
  seen = set()
  for i in range(40):
    record = {**WORLD[i], ELEMENT_KEY: np.int64(i)}
    turns = transform.turns(record)
    seen.add(_form(turns))
    row = transform(record)
    n = int(np.sum(row["tokens"] != ids.pad))
    tokens, mask = row["tokens"], row["target_mask"]
    assert np.array_equal(row["targets"][:n - 1], tokens[1:n]) and np.all(row["targets"][n - 1:] == ids.pad)
    assert np.array_equal(row["positions"][:n], np.repeat(np.arange(n)[:, None], 3, 1))
    assistant = int(np.nonzero(tokens == ids.im_start)[0][-1])  # the last turn's header
    header = len(tk.encode("assistant\n", add_special_tokens=False).ids)
    # supervised targets: exactly the assistant's tokens after its header, the forced
    # <|vision_end|> excepted
    want = np.zeros_like(mask)
    want[assistant + header:n - 1] = True
    want &= row["targets"] != ids.vision_end
    assert np.array_equal(mask, want)
    text = tk.decode(row["targets"][mask].tolist(), skip_special_tokens=True)
    # the assistant's parts, a scene as its caption (lm.scene='caption')
    answer = "".join(p if isinstance(p, str) else p[1]["caption"] for p in turns[1][1])
    assert text == answer
  assert seen == set(lm_task.FORMS)
  held_out = transform(WORLD[3])  # no stream position: a fixed draw per record
  assert all(np.array_equal(held_out[k], transform(WORLD[3])[k]) for k in held_out)


def test_rows_with_scene_maps_carry_one_map_word_per_grid_cell(tmp_path):
  """lm.scene='map': a scene is its 4 x 4 scene map (data.shapesworld.scene_map) on the grid's M-RoPE
  positions, as a vision tower's tokens; drawn by the assistant (draw, document) the words are targets
  (the language model learns caption -> layout; with map_targets=False only the span's start is), shown
  by the user they are not; a document's spans are the maps of its scenes, each on its own grid; a
  tokenizer without the words is refused."""
  path = tokenizer_path("toy")
  world = ShapesWorldSource("train", 8, 40, layout="grid")
  transform = lm_task.ChatRows(path, lm_shapesworld.MAX_LEN, None, np.ones(len(lm_task.FORMS)) / 4, seed=0,
                               scene="map", scene_grid=4, world=world)
  unsupervised = lm_task.ChatRows(path, lm_shapesworld.MAX_LEN, None, np.ones(len(lm_task.FORMS)) / 4, seed=0,
                                  scene="map", scene_grid=4, world=world, map_targets=False)
  ids, tk = transform.ids, load_tokenizer(path)
  forms = set()
  for i in range(40):
    record = {**world[i], ELEMENT_KEY: np.int64(i)}
    turns, row = transform.turns(record), transform(record)
    forms.add(_form(turns))
    drawn = [p[1]["shapes"] for p in turns[1][1] if not isinstance(p, str)]
    shown = [p[1]["shapes"] for p in turns[0][1] if not isinstance(p, str)]
    starts = np.nonzero(row["tokens"] == ids.vision_start)[0]
    assert len(starts) == len(drawn) + len(shown)
    untargeted, words = unsupervised(record), np.zeros(len(row["tokens"]), bool)
    last = -1
    for start, shapes in zip(starts, shown + drawn):
      span = row["tokens"][start + 1:start + 17]
      assert [tk.id_to_token(int(t)) for t in span] == shapesworld.scene_map(shapes, 4)
      assert row["tokens"][start + 17] == ids.vision_end
      p = row["positions"][start + 1:start + 17] - row["positions"][start + 1]
      assert np.array_equal(p[:, 0], np.zeros(16)) and np.array_equal(p[:, 1], np.repeat(np.arange(4), 4))
      assert np.array_equal(p[:, 2], np.tile(np.arange(4), 4))
      assert row["positions"][start + 1, 0] == row["positions"][start, 0] + 1 > last
      last = row["positions"][start + 17, 0]  # after the grid: text resumes past its largest index
      assert last == row["positions"][start + 1, 0] + 4
      # target_mask[k]: predicting token k + 1; the span's words (and its start) are targets when drawn
      assert np.all(row["target_mask"][start - 1:start + 16] == bool(drawn))
      assert not row["target_mask"][start + 16]  # the forced <|vision_end|>
      # lm.map_targets=False: a drawn span's start stays a target, its words never are
      mask = untargeted["target_mask"]
      assert mask[start - 1] == bool(drawn) and not mask[start:start + 17].any()
      words[start:start + 16] = True
    assert np.array_equal(untargeted["tokens"], row["tokens"])  # and nothing else moves
    assert np.array_equal(untargeted["target_mask"][~words], row["target_mask"][~words])
  assert forms == set(lm_task.FORMS)
  plain = str(tmp_path / "plain.json")
  toy_tokenizer.train_tokenizer(["a red circle"], plain)
  with pytest.raises(UserError, match="scene-map words as tokens"):
    lm_task.ChatRows(plain, 80, None, NO_DOCUMENTS, seed=0, scene="map", scene_grid=4)
  with pytest.raises(UserError, match="lm.forms.document=0"):
    lm_task.ChatRows(path, 80, None, np.ones(4) / 4, seed=0, scene="map", scene_grid=4)


def test_rows_with_a_vision_tower_carry_the_image_as_its_tokens():
  """A scene is a span of 4 x 4 <|image_pad|> (never targets) on its M-RoPE grid; patches are the Qwen
  processor's of the record's image; image_index numbers the span's tokens."""
  config = lm_shapesworld.get_config("smoke,vision")
  vision = QwenConfig.from_config(config.model).vision
  transform = lm_task.ChatRows(tokenizer_path("toy"), lm_shapesworld.MAX_LEN, None, NO_DOCUMENTS, 0, vision,
                               32)
  ids = transform.ids
  world = shapesworld.from_config(config.data, "train")
  for i in range(12):
    record = {**world[i], ELEMENT_KEY: np.int64(i)}
    row = transform(record)
    pads = np.nonzero(row["tokens"] == ids.image_pad)[0]
    assert len(pads) == 16 and np.array_equal(pads, np.arange(pads[0], pads[0] + 16))
    assert row["tokens"][pads[0] - 1] == ids.vision_start and row["tokens"][pads[-1] + 1] == ids.vision_end
    assert not row["target_mask"][pads[0] - 1:pads[-1] + 1].any()  # no image token is a target
    assert np.array_equal(row["image_index"][pads], np.arange(16))
    assert np.sum(row["image_index"] >= 0) == 16
    p = row["positions"][pads]  # (t, h, w): one t, the 4 x 4 grid in raster order
    assert len(set(p[:, 0])) == 1
    assert np.array_equal(p[:, 1] - p[0, 1], np.repeat(np.arange(4), 4))
    assert np.array_equal(p[:, 2] - p[0, 2], np.tile(np.arange(4), 4))
    want, grid = preprocess_image(Image.fromarray(record["image"]), vision, 1024, 1024)
    assert grid == (1, 8, 8) and np.array_equal(row["patches"], want)
  with pytest.raises(UserError, match="expected 32x32 RGB images"):
    transform(WORLD[0])  # an 8-px record
  with pytest.raises(UserError, match="positive multiple of 8"):  # 4-px patches merged 2 x 2
    lm_task.image_grid(vision, 36)


def test_packed_rows_hold_each_conversation_as_if_alone():
  """data.pack > 1: a packed record's conversations fill the row longest first, each that still fits, each
  its own segment with the fields it has alone (positions restarting at 0); the loss of a packed batch is the
  sum of its conversations' losses alone (attention stays in a segment), and answer_exact counts
  conversations; a vision tower's row is not packed."""
  config = lm_shapesworld.get_config("smoke")
  assert config.data.pack == lm_shapesworld.PACK == 4
  task = tasks.build_task(config, parallel.make_mesh(config.mesh), parallel.logical_rules(config))
  transform = task.record_transform
  source = pipeline.build_source(config.data, "train")
  world = shapesworld.from_config(config.data, "train")
  assert len(source) == len(world) // 4
  rows, alone, dropped = [], [], 0
  for j in range(12):
    record = {**source[j], ELEMENT_KEY: np.int64(j)}
    convs = [transform.conversation({**r, ELEMENT_KEY: np.int64(j)}, m)
             for m, r in enumerate(record[pipeline.RECORDS_KEY])]
    row, used, kept = transform(record), 0, []
    for c in sorted(convs, key=lambda c: -len(c["tokens"])):  # longest first, by hand
      if used + len(c["tokens"]) <= config.data.max_len:
        kept.append(c)
        used += len(c["tokens"])
    dropped += len(convs) - len(kept)
    seg, start = row["segment_ids"], 0
    assert np.all(seg[used:] == 0) and np.all(row["tokens"][used:] == transform.ids.pad)
    for m, c in enumerate(kept, 1):
      n = len(c["tokens"])
      assert np.all(seg[start:start + n] == m)
      for k in c:
        np.testing.assert_array_equal(row[k][start:start + n], c[k])
      assert np.all(c["positions"][0] == 0)
      start += n
    rows.append(row)
    alone += [transform.row([c]) for c in kept]
  assert dropped > 0  # some rows are full (a packing check, not only a concatenation)
  forms = {_form(transform.turns({**world[4 * j + m], ELEMENT_KEY: np.int64(j)}, m))
           for j in range(12) for m in range(4)}
  assert forms == set(lm_task.FORMS)  # the m-th record of a row draws its own form

  params = jax.tree.map(lambda x: x * 20, nn.unbox(task.init_fn(jax.random.key(1))))  # far from uniform
  stack = lambda rs: {k: jnp.asarray(np.stack([r[k] for r in rs])) for k in rs[0]}
  packed_sum, packed_count = task.loss_fn(params, None, stack(rows), None)["ntp"]
  alone_sum, alone_count = task.loss_fn(params, None, stack(alone), None)["ntp"]
  assert float(packed_count) == float(alone_count)
  np.testing.assert_allclose(float(packed_sum), float(alone_sum), rtol=1e-5)
  exact = task.eval_fn(params, None, stack(rows), None)["answer_exact"]
  np.testing.assert_array_equal(np.asarray(exact[1]), [r["segment_ids"].max() for r in rows])
  exact_alone = task.eval_fn(params, None, stack(alone), None)["answer_exact"]
  assert float(jnp.sum(exact[0])) == float(jnp.sum(exact_alone[0]))
  vision = QwenConfig.from_config(lm_shapesworld.get_config("smoke,vision").model).vision
  with pytest.raises(UserError, match="data.pack=4: a row of the lm task with a vision tower"):
    lm_task.ChatRows(tokenizer_path("toy"), 144, None, NO_DOCUMENTS, 0, vision, 32, pack=4)
  with pytest.raises(UserError, match="more than data.pack=4"):
    transform({pipeline.RECORDS_KEY: [world[i] for i in range(5)]})


def test_bad_inputs_name_the_field(tmp_path):
  config = lm_shapesworld.get_config("smoke")
  config.lm.forms = {"qa": 1.0, "poems": 1.0}
  with pytest.raises(UserError, match=r"lm.forms=.*poems"):
    tasks.build_task(config, parallel.make_mesh(config.mesh), parallel.logical_rules(config))
  config = lm_shapesworld.get_config("smoke")
  config.model.vocab_size = 100
  with pytest.raises(UserError, match=r"model.vocab_size >= "):
    tasks.build_task(config, parallel.make_mesh(config.mesh), parallel.logical_rules(config))
  with pytest.raises(UserError, match="expected comma-separated options"):
    lm_shapesworld.get_config("huge")
  config = lm_shapesworld.get_config("smoke")
  config.lm.scene = "poem"
  with pytest.raises(UserError, match=r"lm.scene='poem': expected one of \('map', 'caption'\)"):
    tasks.build_task(config, parallel.make_mesh(config.mesh), parallel.logical_rules(config))
  config.lm.scene, config.lm.scene_grid = "map", 0
  with pytest.raises(UserError, match="lm.scene_grid >= 1"):
    tasks.build_task(config, parallel.make_mesh(config.mesh), parallel.logical_rules(config))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The smoke lm run of the vision-language model (a few steps) through the loop: its summary and
  workdir."""
  workdir = str(tmp_path_factory.mktemp("lm"))
  config = lm_shapesworld.get_config("smoke,vision")
  return loop.train_and_evaluate(config, workdir), workdir, config


def test_loss_and_held_out_metrics_are_token_level(trained):
  """The task's ntp term is (sum of CE over supervised tokens, their count); the held-out metrics
  recomputed by hand on the exported parameters."""
  summary, workdir, config = trained
  mesh = parallel.make_mesh(config.mesh)
  task = tasks.build_task(config, mesh, parallel.logical_rules(config))
  _, params, _ = load_vlm(summary["export"])
  world = shapesworld.from_config(config.data, "test")
  rows = [task.record_transform(world[i]) for i in range(8)]
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
  terms = task.loss_fn(params, None, batch, jax.random.key(0))
  model, _, _ = load_vlm(summary["export"])
  # by hand: each row's image through the vision tower alone, its tokens at the row's image pads
  x = model.apply({"params": params}, batch["tokens"], method=Qwen2_5_VL.embed)
  for b, r in enumerate(rows):
    tokens = model.apply({"params": params}, jnp.asarray(r["patches"]), ((1, 8, 8),),
                         method=Qwen2_5_VL.encode_images)
    x = x.at[b, np.nonzero(r["image_index"] >= 0)[0]].set(tokens)
  logits = model.apply({"params": params}, embeds=x, positions=batch["positions"])["logits"]
  vocab = load_tokenizer(config.tokenizer if config.tokenizer != "toy" else tokenizer_path("toy"))
  ce = text_ce(logits, batch["targets"], vocab.get_vocab_size(with_added_tokens=True))
  mask = np.asarray(batch["target_mask"])
  s, c = terms["ntp"]
  np.testing.assert_allclose(float(s), float(np.sum(np.asarray(ce)[mask])), rtol=1e-5)
  assert float(c) == mask.sum()
  out = task.eval_fn(params, None, batch, jax.random.key(0))
  right = np.asarray(jnp.argmax(logits, -1) == batch["targets"])
  np.testing.assert_allclose(np.asarray(out["token_accuracy"][0]), np.sum(right & mask, 1))
  np.testing.assert_allclose(np.asarray(out["answer_exact"][0]), np.all(right | ~mask, 1))
  np.testing.assert_array_equal(np.asarray(out["answer_exact"][1]), 1.0)  # one conversation a row
  assert set(summary["eval"]) == {"text_ce", "token_accuracy", "answer_exact"}
  assert summary["eval"]["text_ce"] > 0


def test_export_is_the_starflow2_tasks_frozen_vlm(trained):
  summary, _, _ = trained
  _, params, _ = load_vlm(summary["export"])
  config = starflow2_shapesworld.get_config("stage=1,smoke")
  config.vlm.checkpoint = summary["export"]
  mesh = parallel.make_mesh(config.mesh)
  _, frozen, qcfg = frozen_vlm(config, mesh, parallel.logical_rules(config), jax.random.key(0))
  assert qcfg.hidden_size == lm_shapesworld.model()["hidden_size"] and qcfg.vision is None
  assert "visual" in params and set(frozen) == set(params) - {"visual"}  # STARFlow2 drops the tower
  params = {k: v for k, v in params.items() if k != "visual"}
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
