"""The toy tokenizer (issue 11 item 1): byte-level BPE with the Qwen specials, trained on ShapesWorld."""
import os

import pytest

from starflow2_jax.data.shapesworld import MAP_WORDS
from starflow2_jax.errors import UserError
from starflow2_jax.pretzel import toy_tokenizer
from starflow2_jax.pretzel.examples import CAPTION_QUESTION
from starflow2_jax.pretzel.tokens import special_tokens
from starflow2_jax.vlm.tokenizer import DEFAULT_SYSTEM, QWEN_SPECIAL_TOKENS, load_tokenizer

RECORDS = 300


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("toy") / "tokenizer.json")
  texts = toy_tokenizer.shapesworld_texts(RECORDS)
  return toy_tokenizer.train_tokenizer(texts, path), texts


def test_loads_with_the_vlm_loader_and_has_the_qwen_specials(trained):
  path, _ = trained
  tk = load_tokenizer(os.path.dirname(path))  # a directory holding tokenizer.json
  assert [tk.token_to_id(t) for t in QWEN_SPECIAL_TOKENS] == list(range(len(QWEN_SPECIAL_TOKENS)))
  ids = special_tokens(tk)
  chat = "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>hi<|im_end|>"
  enc = tk.encode(chat).ids
  assert enc[:2] == [ids.im_start, *tk.encode("user").ids] and enc[-1] == ids.im_end
  assert enc.count(ids.image_pad) == 2 and enc.count(ids.vision_start) == enc.count(ids.vision_end) == 1
  assert tk.get_vocab_size() <= toy_tokenizer.DEFAULT_VOCAB


def test_shapesworld_text_round_trips_compactly(trained):
  """Every training text decodes back exactly; ShapesWorld words are single tokens (a caption takes
  one token per word); any other text still encodes (bytes), never as unknown."""
  path, texts = trained
  tk = load_tokenizer(path)
  assert DEFAULT_SYSTEM in texts and CAPTION_QUESTION in texts
  for t in texts:
    assert tk.decode(tk.encode(t).ids) == t
  caption = "a red circle to the left of a blue square"
  assert len(tk.encode(caption).ids) == len(caption.split())
  odd = "Zürich ✓ 42\ttabs"
  assert tk.decode(tk.encode(odd).ids) == odd


def test_refuses_to_overwrite_and_names_a_too_small_vocabulary(trained, tmp_path):
  path, _ = trained
  with pytest.raises(FileExistsError, match="refusing to overwrite"):
    toy_tokenizer.train_tokenizer(["a"], path)
  with pytest.raises(UserError, match="vocab_size=100: .* needs at least 278"):
    toy_tokenizer.train_tokenizer(["a"], str(tmp_path / "t.json"), vocab_size=100)
  out = toy_tokenizer.train_shapesworld_tokenizer(str(tmp_path / "sw.json"), num_records=20)
  tk = load_tokenizer(out)
  assert special_tokens(tk).image_pad == QWEN_SPECIAL_TOKENS.index("<|image_pad|>")
  # the scene-map words (lm.scene='map'): one token each, right after the Qwen specials
  first = len(QWEN_SPECIAL_TOKENS)
  assert [tk.token_to_id(w) for w in MAP_WORDS] == list(range(first, first + len(MAP_WORDS)))
  assert tk.encode("".join(MAP_WORDS[:3])).ids == list(range(first, first + 3))


def test_grid_layout_texts_name_the_cells(tmp_path):
  """The texts of the grid layout (the demo's) carry the cell names, which become whole-word tokens."""
  texts = toy_tokenizer.shapesworld_texts(RECORDS, layout="grid")
  assert any(" at the top left" in t for t in texts) and any(" at the centre" in t for t in texts)
  tk = load_tokenizer(toy_tokenizer.train_tokenizer(texts, str(tmp_path / "tokenizer.json")))
  caption = "a large red circle at the bottom right"
  assert len(tk.encode(caption).ids) <= len(caption.split())
