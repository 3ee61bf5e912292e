"""A small tokenizer trained locally (Hugging Face `tokenizers`), for the toy STARFlow2 pipeline.

Byte-level BPE like Qwen2.5: NFC, the Qwen pre-tokeniser regex, GPT-2's byte alphabet (every string
encodes, none is unknown), and the 22 Qwen special tokens (<|endoftext|>, <|im_start|>, <|im_end|>,
<|vision_start|>, <|vision_end|>, <|image_pad|>, ...) at ids 0..21, then any extra special tokens
(ShapesWorld's: its scene-map words, `data.shapesworld.MAP_WORDS`), then the 256 bytes, then the
merges. Written as a tokenizer.json that `vlm.tokenizer.load_tokenizer` loads.

  python -c "from starflow2_jax.pretzel import toy_tokenizer as t; t.train_shapesworld_tokenizer('tok.json')"
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

from starflow2_jax.data.shapesworld import MAP_WORDS, ShapesWorldSource
from starflow2_jax.errors import UserError
from starflow2_jax.pretzel.examples import CAPTION_QUESTION, ShapesWorldExamples
from starflow2_jax.vlm.tokenizer import DEFAULT_SYSTEM, QWEN_PATTERN, QWEN_SPECIAL_TOKENS

BYTE_ALPHABET = 256
DEFAULT_VOCAB = 512  # ShapesWorld's few dozen words all become single tokens well below this
DEFAULT_RECORDS = 5000  # ShapesWorld scenes whose text trains the tokenizer


def train_tokenizer(texts: Iterable[str], out_path: str, vocab_size: int = DEFAULT_VOCAB,
                    extra_special: Sequence[str] = ()) -> str:
  """Train a byte-level BPE with the Qwen special tokens and `extra_special` on `texts`; write it to
  out_path (refused if the file exists) and return the path."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
  from tokenizers import trainers
  special = list(QWEN_SPECIAL_TOKENS) + list(extra_special)
  least = BYTE_ALPHABET + len(special)
  if vocab_size < least:
    raise UserError(f"vocab_size={vocab_size}: a byte-level tokenizer with {len(special)} special tokens "
                    f"needs at least {least}")
  if os.path.exists(out_path):
    raise FileExistsError(f"{out_path} exists: refusing to overwrite a tokenizer; choose another path")
  tk = Tokenizer(models.BPE(fuse_unk=False))
  tk.normalizer = normalizers.NFC()
  tk.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tk.decoder = decoders.ByteLevel()
  specials = [AddedToken(t, special=True, normalized=False) for t in special]
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tk.train_from_iterator(texts, trainer)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  tmp = f"{out_path}.{os.getpid()}.tmp"
  tk.save(tmp)
  os.replace(tmp, out_path)  # atomic: a reader never sees a partial file
  return out_path


def shapesworld_texts(num_records: int = DEFAULT_RECORDS, seed: int = 0, exclude=(),
                      layout: str = "free") -> list[str]:
  """Every text the Pretzel ShapesWorld examples use on the first `num_records` training scenes:
  captions, questions, answers, editing instructions, interleaved prompts and parts, the default
  system prompt and the captioning question (no image is rendered)."""
  world = ShapesWorldSource("train", 8, num_records, seed, exclude, layout)
  texts = [DEFAULT_SYSTEM, CAPTION_QUESTION, "system\n", "user\n", "assistant\n"]
  drawn = [ShapesWorldExamples(world, kind, seed) for kind in ("editing", "interleaved")]
  for i in range(num_records):
    shapes = world.scene(i)
    qs, ans = ShapesWorldSource.qa(shapes)
    texts += [ShapesWorldSource.caption(shapes), *qs, *ans]
    for src in drawn:  # their text as the example sources draw it
      record, _ = src.text_record(i)
      texts += [record.get("instruction", record.get("prompt"))]
      texts += [p for p in record.get("parts", []) if isinstance(p, str)]
  return texts


def train_shapesworld_tokenizer(out_path: str, vocab_size: int = DEFAULT_VOCAB,
                                num_records: int = DEFAULT_RECORDS, seed: int = 0, exclude=(),
                                layout: str = "free") -> str:
  """The toy tokenizer: `train_tokenizer` on `shapesworld_texts` (of ShapesWorld's `layout`), with the
  scene-map words as special tokens; returns out_path."""
  return train_tokenizer(shapesworld_texts(num_records, seed, exclude, layout), out_path, vocab_size,
                         MAP_WORDS)
