"""The special token ids of a Pretzel sequence, read from the tokenizer (never hard-coded: the Qwen2.5
tokenizer and the project's toy tokenizers give them different ids).

  tk = vlm.tokenizer.load_tokenizer("qwen2.5")   # or a tokenizer.json path / directory
  ids = special_tokens(tk)  # SpecialTokens(im_start=151644, im_end=151645, vision_start=151652, ...)
"""
from __future__ import annotations

import dataclasses

from starflow2_jax.errors import UserError
from starflow2_jax.vlm import tokenizer as tok_lib

# Field -> token text. Qwen2.5 pads with <|endoftext|>, which is also its end-of-document token.
TOKEN_TEXT = {
    "im_start": tok_lib.IM_START,
    "im_end": tok_lib.IM_END,
    "vision_start": tok_lib.VISION_START,
    "vision_end": tok_lib.VISION_END,
    "image_pad": tok_lib.IMAGE_PAD,
    "pad": tok_lib.END_OF_TEXT,
    "eos": tok_lib.END_OF_TEXT,
}


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """Token ids (int) of the chat and vision specials. `image_pad` fills the latent slots of an image
  span (a placeholder, never embedded); `pad` fills the row after the last example."""
  im_start: int
  im_end: int
  vision_start: int
  vision_end: int
  image_pad: int
  pad: int
  eos: int

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end generated text (section 7.7): <|im_end|> and <|endoftext|>."""
    return tuple(sorted({self.im_end, self.eos}))


def special_tokens(tokenizer) -> SpecialTokens:
  """tokenizer: a `tokenizers.Tokenizer`, or a spec for `vlm.tokenizer.load_tokenizer` ('qwen2.5', a
  tokenizer.json file or a directory holding one) -> its SpecialTokens. UserError listing every missing
  token."""
  if isinstance(tokenizer, str):
    tokenizer = tok_lib.load_tokenizer(tokenizer)
  ids = {field: tokenizer.token_to_id(text) for field, text in TOKEN_TEXT.items()}
  missing = sorted({TOKEN_TEXT[f] for f, i in ids.items() if i is None})
  if missing:
    raise UserError(f"the tokenizer has no {', '.join(missing)} token(s): a Pretzel sequence needs the "
                    f"Qwen chat and vision special tokens {sorted(set(TOKEN_TEXT.values()))}; use the "
                    "Qwen2.5 tokenizer ('qwen2.5') or one from starflow2_jax.pretzel.toy_tokenizer")
  return SpecialTokens(**ids)
