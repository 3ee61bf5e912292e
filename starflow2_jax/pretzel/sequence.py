"""Pretzel training sequences (STARFLOW2.md sections 4.2, 4.3, 5.2, 5.5): records -> one token row.

Records (dicts; `examples.py` makes them). Every kind has "kind" and "images" (a list of uint8
[S, S, 3], S = spec.image_size; a single "image" is accepted for the one-image kinds):
  text_to_image  {"caption": str}                        user: caption;  assistant: images[0]
  understanding  {"question": str, "answer": str}        user: images[0], question;  assistant: answer
  editing        {"instruction": str}                    user: images[0], instruction;  assistant: images[1]
  interleaved    {"prompt": str, "parts": [str | int]}   user: prompt;  assistant: the parts, an int
                                                         being an index into "images" (each used once)
A record {"records": [record, ...]} packs several examples into one row (see `PretzelTransform`).

The Qwen2.5 chat text of a text-to-image example (system turn from spec.system_prompt, None: none):
  <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{caption}<|im_end|>\\n
  <|im_start|>assistant\\n<|vision_start|>[N latent slots]<|vision_end|><|im_end|>
An image span is <|vision_start|> + N = h * w slots holding <|image_pad|> (raster order over the latent
grid spec.grid) + <|vision_end|>; images in a user turn come before its text, where Qwen puts them.
Text is tokenised piece by piece between the specials (special-token text inside a caption stays text).

One example row, NumPy, L = spec.max_len, I = spec.max_images (the contract with the model):
  tokens       int32 [L]     ids; latent slots hold image_pad, pads hold pad
  targets      int32 [L]     tokens[t + 1] inside the same example, pad at each example's end
  target_mask  bool  [L]     L_NTP supervises t: targets[t] is assistant text, the assistant's closing
                             <|im_end|> or an assistant image's <|vision_start|>; never system or user
                             tokens, latents, the forced <|vision_end|> or pads
  positions    int32 [L, 3]  M-RoPE (t, h, w) ids of `vlm.positions` (get_rope_index; spec.image_positions
                             "1d": 1-D), restarting at 0 in every packed example, pads 0
  segment_ids  int32 [L]     1, 2, ... per packed example, 0 = pad (attention: causal AND same segment)
  is_image     bool  [L]     latent slots
  image_slot   int32 [L]     index into `images` of a latent's image, -1 elsewhere
  image_cell   int32 [L]     raster index n in that image's latent grid, -1 elsewhere
  images       uint8 [I, S, S, 3]  in order of appearance in the row, zeros where unused
  image_valid  bool  [I]
  image_flow_loss bool [I]   the image carries L_NF: assistant images (generation and editing targets,
                             interleaved images); user-turn images only with spec.nf_on_input_images

Caption dropout (section 5.5): an example with an assistant image loses its user text (caption,
instruction, prompt; user images stay) with probability spec.caption_dropout, drawn from
(seed, pipeline element, example in the row): the null template. Examples without an assistant image
carry no flow loss and keep their text (understanding images precede the question, so with
nf_on_input_images the question does not condition them either).

Truncation to spec.max_len: text pieces (user and assistant text) are cut from their ends, the longest
first, until the example fits; templates and image spans are never cut, and an example they alone make
longer than max_len is a UserError.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

from starflow2_jax.data.pipeline import ELEMENT_KEY, RECORDS_KEY
from starflow2_jax.errors import UserError
from starflow2_jax.pretzel.tokens import SpecialTokens, special_tokens
from starflow2_jax.vlm import tokenizer as tok_lib
from starflow2_jax.vlm.positions import mrope_positions

KINDS = ("text_to_image", "understanding", "editing", "interleaved")
TEXT_FIELDS = {"text_to_image": ("caption",), "understanding": ("question", "answer"),
               "editing": ("instruction",), "interleaved": ("prompt", "parts")}
NUM_IMAGES = {"text_to_image": 1, "understanding": 1, "editing": 2}  # interleaved: from its parts
POSITION_MODES = ("mrope", "1d")
IMAGE_CHANNELS = 3
_DROPOUT_STREAM = 2  # sub-stream of the (seed, element, stream, example) RNG (the pipeline's flip is 1)


@dataclasses.dataclass(frozen=True)
class SequenceSpec:
  """How records become rows.

  max_len: row length L (data.max_len). max_images: image slots I per row. grid: (h, w) latent grid of
  an image, N = h * w slots. image_size: pixel side S of the images. image_positions: "mrope" | "1d".
  system_prompt: the system turn's text (None: no system turn). caption_dropout: probability of the null
  template. nf_on_input_images: user-turn images carry L_NF too. pack: most examples per row (a record
  may hold up to this many in "records").
  """
  max_len: int = 1024
  max_images: int = 1
  grid: tuple[int, int] = (16, 16)
  image_size: int = 256
  image_positions: str = "mrope"
  system_prompt: str | None = tok_lib.DEFAULT_SYSTEM
  caption_dropout: float = 0.1
  nf_on_input_images: bool = False
  pack: int = 1

  def __post_init__(self):
    object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
    for name in ("max_len", "max_images", "image_size", "pack"):
      if int(getattr(self, name)) < 1:
        raise UserError(f"SequenceSpec.{name}={getattr(self, name)}: expected a positive integer")
    if len(self.grid) != 2 or min(self.grid) < 1:
      raise UserError(f"SequenceSpec.grid={self.grid}: expected (h, w), two positive latent grid sides")
    if self.image_positions not in POSITION_MODES:
      raise UserError(f"image_positions (vlm.image_positions)={self.image_positions!r}: expected one of "
                      f"{POSITION_MODES}")
    if not 0.0 <= float(self.caption_dropout) <= 1.0:
      raise UserError(f"data.caption_dropout={self.caption_dropout}: expected a probability in [0, 1]")

  @property
  def num_latents(self) -> int:
    return self.grid[0] * self.grid[1]

  @classmethod
  def from_config(cls, data, grid: tuple[int, int], image_positions: str = "mrope",
                  nf_on_input_images: bool = False) -> "SequenceSpec":
    """From the data config (`examples.default_data_config()`: max_len, max_images, image_size,
    system_prompt, caption_dropout, pack) and the model's latent grid and position options."""
    return cls(max_len=int(data.max_len), max_images=int(data.max_images), grid=tuple(grid),
               image_size=int(data.image_size), image_positions=image_positions,
               system_prompt=data.system_prompt, caption_dropout=float(data.caption_dropout),
               nf_on_input_images=bool(nf_on_input_images), pack=int(data.pack))


@dataclasses.dataclass
class Example:
  """One example before packing, n = its length; `image` is the index into `images` (-1: none)."""
  tokens: np.ndarray  # int32 [n]
  supervised: np.ndarray  # bool [n]: predicting this token is supervised (target_mask is it shifted)
  image: np.ndarray  # int32 [n], latent slots only
  cell: np.ndarray  # int32 [n]
  images: list  # uint8 [S, S, 3] each, in order of appearance
  flow_loss: list  # bool per image
  positions: np.ndarray  # int32 [n, 3]

  def __len__(self) -> int:
    return len(self.tokens)


class _Piece(NamedTuple):
  """A run of tokens: ids, whether predicting them is supervised, the record's image index of latent
  slots (-1: not latents), whether it is user or assistant text (truncatable)."""
  ids: list
  supervised: bool
  image: int
  text: bool


def _field(record: dict, name: str, kind: str):
  if name not in record:
    raise UserError(f"a {kind!r} record needs the field {name!r} (fields {TEXT_FIELDS[kind]} and "
                    f"'images'); found fields {sorted(record)}")
  return record[name]


def _images(record: dict, kind: str, spec: SequenceSpec) -> list:
  if "images" in record:
    images = list(record["images"])
  elif "image" in record:
    images = [record["image"]]
  else:
    raise UserError(f"a {kind!r} record needs the field 'images' (a list of uint8 [S, S, 3] images); "
                    f"found fields {sorted(record)}")
  want = (spec.image_size, spec.image_size, IMAGE_CHANNELS)
  for n, im in enumerate(images):
    im = np.asarray(im)
    if im.shape != want or im.dtype != np.uint8:
      raise UserError(f"a {kind!r} record's image {n} is {im.dtype} {im.shape}, expected uint8 {want} "
                      "(data.image_size, RGB)")
  return images


def conversation(record: dict, spec: SequenceSpec) -> tuple[list, list]:
  """record -> (turns [(role, parts)], images); a part is a str or an int index into images."""
  kind = record.get("kind")
  if kind not in KINDS:
    raise UserError(f"record field 'kind'={kind!r}: expected one of {KINDS}; found fields {sorted(record)}")
  text = [_field(record, f, kind) for f in TEXT_FIELDS[kind]]
  bad = [f for f, v in zip(TEXT_FIELDS[kind], text) if f != "parts" and not isinstance(v, str)]
  if bad:
    raise UserError(f"a {kind!r} record's field(s) {bad} must be strings, found "
                    f"{[type(record[f]).__name__ for f in bad]}")
  images = _images(record, kind, spec)
  if kind in NUM_IMAGES and len(images) != NUM_IMAGES[kind]:
    raise UserError(f"a {kind!r} record needs {NUM_IMAGES[kind]} image(s), found {len(images)}")
  if kind == "text_to_image":
    turns = [("user", [text[0]]), ("assistant", [0])]
  elif kind == "understanding":
    turns = [("user", [0, text[0]]), ("assistant", [text[1]])]
  elif kind == "editing":
    turns = [("user", [0, text[0]]), ("assistant", [1])]
  else:
    if not isinstance(text[1], (list, tuple)):
      raise UserError(f"an 'interleaved' record's 'parts' must be a list of strings and image indices, "
                      f"found {type(text[1]).__name__}")
    parts = list(text[1])
    refs = [p for p in parts if not isinstance(p, str)]
    if any(not isinstance(p, (int, np.integer)) or not 0 <= p < len(images) for p in refs) or \
        len(set(refs)) != len(refs):
      raise UserError(f"an 'interleaved' record's parts must be strings and indices into its "
                      f"{len(images)} image(s), each used once; found {[type(p).__name__ for p in parts]} "
                      f"with indices {refs}")
    turns = [("user", [text[0]]), ("assistant", [p if isinstance(p, str) else int(p) for p in parts])]
  return turns, images


def drop_user_text(turns: list) -> list:
  """The null template: user text replaced by the empty string, user images kept."""
  return [(role, [p for p in parts if role != "user" or not isinstance(p, str)]) for role, parts in turns]


def has_assistant_image(turns: list) -> bool:
  return any(not isinstance(p, str) for role, parts in turns if role == "assistant" for p in parts)


def _cut(lengths: list[int], budget: int) -> list[int]:
  """Kept lengths: the largest cap c with sum(min(l, c)) <= budget, the remainder to the first pieces
  longer than c (the longest pieces lose tokens first)."""
  lo, hi = 0, max(lengths)
  while lo < hi:
    c = (lo + hi + 1) // 2
    if sum(min(n, c) for n in lengths) <= budget:
      lo = c
    else:
      hi = c - 1
  kept = [min(n, lo) for n in lengths]
  extra = budget - sum(kept)
  for i, n in enumerate(lengths):
    if extra and n > lo:
      kept[i] += 1
      extra -= 1
  return kept


class SequenceBuilder:
  """Turns conversations into `Example`s with one tokenizer (a `tokenizers.Tokenizer`)."""

  def __init__(self, spec: SequenceSpec, tokenizer):
    self.spec, self.tk = spec, tokenizer
    self.ids: SpecialTokens = special_tokens(tokenizer)
    self._header = {role: self.encode(f"{role}\n") for role in ("system", "user", "assistant")}
    self._newline = self.encode("\n")

  def encode(self, text: str) -> list[int]:
    return list(self.tk.encode(text, add_special_tokens=False).ids) if text else []

  def _pieces(self, turns: list) -> list[_Piece]:
    ids, n_lat = self.ids, self.spec.num_latents
    system = self.spec.system_prompt
    full = ([("system", [system])] if system is not None else []) + list(turns)
    pieces = []
    for t, (role, parts) in enumerate(full):
      sup = role == "assistant"
      pieces.append(_Piece([ids.im_start, *self._header[role]], False, -1, False))
      for p in parts:
        if isinstance(p, str):
          pieces.append(_Piece(self.encode(p), sup, -1, role != "system"))
        else:
          pieces.append(_Piece([ids.vision_start], sup, -1, False))
          pieces.append(_Piece([ids.image_pad] * n_lat, False, p, False))
          pieces.append(_Piece([ids.vision_end], False, -1, False))  # forced: never a text target
      pieces.append(_Piece([ids.im_end], sup, -1, False))
      if t + 1 < len(full):
        pieces.append(_Piece(self._newline, False, -1, False))
    return pieces

  def _truncate(self, pieces: list[_Piece], kind: str) -> list[_Piece]:
    total = sum(len(p.ids) for p in pieces)
    max_len = self.spec.max_len
    if total <= max_len:
      return pieces
    text = [i for i, p in enumerate(pieces) if p.text]
    fixed = total - sum(len(pieces[i].ids) for i in text)
    if fixed > max_len:
      spans = sum(1 for p in pieces if p.image >= 0)
      raise UserError(
          f"a {kind!r} example needs {fixed} tokens without any of its text ({spans} image span(s) of "
          f"{self.spec.num_latents + 2} tokens plus the chat template), more than data.max_len={max_len}:"
          " raise data.max_len, or use fewer images or a smaller latent grid")
    kept = _cut([len(pieces[i].ids) for i in text], max_len - fixed)
    out = list(pieces)
    for i, k in zip(text, kept):
      out[i] = pieces[i]._replace(ids=pieces[i].ids[:k])
    return out

  def example(self, record: dict, drop_caption: bool = False) -> Example:
    """One record (not a packed one) -> Example; drop_caption: the null template when the example has
    an assistant image."""
    spec = self.spec
    turns, images = conversation(record, spec)
    if drop_caption and has_assistant_image(turns):
      turns = drop_user_text(turns)
    pieces = self._truncate(self._pieces(turns), record["kind"])
    order, roles = [], {}  # record image index -> slot in order of appearance
    for role, parts in turns:
      for p in parts:
        if not isinstance(p, str):
          order.append(p)
          roles[p] = role
    if len(order) > spec.max_images:
      raise UserError(f"a {record['kind']!r} example has {len(order)} images, more than "
                      f"data.max_images={spec.max_images}: raise data.max_images")
    slot = {p: s for s, p in enumerate(order)}
    tokens = np.concatenate([np.asarray(p.ids, np.int32) for p in pieces])
    supervised = np.concatenate([np.full(len(p.ids), p.supervised, bool) for p in pieces])
    image = np.concatenate([np.full(len(p.ids), slot.get(p.image, -1), np.int32) for p in pieces])
    cell = np.concatenate([np.arange(len(p.ids), dtype=np.int32) if p.image >= 0 else
                           np.full(len(p.ids), -1, np.int32) for p in pieces])
    positions, _ = mrope_positions(tokens[None], None, [spec.grid] * len(order), self.ids.image_pad,
                                   spec.image_positions)
    flow_loss = [roles[p] == "assistant" or spec.nf_on_input_images for p in order]
    return Example(tokens, supervised, image, cell, [np.asarray(images[p], np.uint8) for p in order],
                   flow_loss, positions[0])


def fits(examples: Sequence[Example], spec: SequenceSpec) -> bool:
  return sum(map(len, examples)) <= spec.max_len and sum(len(e.images) for e in examples) <= spec.max_images


def first_fit(examples: Sequence[Example], spec: SequenceSpec) -> list[Example]:
  """The examples, in order, that fit one row together: each is added if the row still has room for its
  tokens and images (the others are left out)."""
  chosen = []
  for e in examples:
    if fits(chosen + [e], spec):
      chosen.append(e)
  return chosen


def pack(examples: Sequence[Example], spec: SequenceSpec, pad_id: int) -> dict:
  """Examples -> one right-padded row (the module docstring's fields); UserError if they do not fit."""
  if not fits(examples, spec):
    raise UserError(f"{len(examples)} example(s) of {sum(map(len, examples))} tokens and "
                    f"{sum(len(e.images) for e in examples)} images do not fit one row of "
                    f"data.max_len={spec.max_len} tokens and data.max_images={spec.max_images} images "
                    "(first_fit chooses examples that do)")
  length, n_img, size = spec.max_len, spec.max_images, spec.image_size
  row = {
      "tokens": np.full(length, pad_id, np.int32), "targets": np.full(length, pad_id, np.int32),
      "target_mask": np.zeros(length, bool), "positions": np.zeros((length, 3), np.int32),
      "segment_ids": np.zeros(length, np.int32), "is_image": np.zeros(length, bool),
      "image_slot": np.full(length, -1, np.int32), "image_cell": np.full(length, -1, np.int32),
      "images": np.zeros((n_img, size, size, IMAGE_CHANNELS), np.uint8),
      "image_valid": np.zeros(n_img, bool), "image_flow_loss": np.zeros(n_img, bool)}
  start, first_slot = 0, 0
  for seg, e in enumerate(examples, 1):
    sl = slice(start, start + len(e))
    row["tokens"][sl] = e.tokens
    row["targets"][start:start + len(e) - 1] = e.tokens[1:]
    row["target_mask"][start:start + len(e) - 1] = e.supervised[1:]
    row["positions"][sl] = e.positions
    row["segment_ids"][sl] = seg
    row["is_image"][sl] = e.image >= 0
    row["image_slot"][sl] = np.where(e.image >= 0, e.image + first_slot, -1)
    row["image_cell"][sl] = e.cell
    for k, (im, nf) in enumerate(zip(e.images, e.flow_loss)):
      row["images"][first_slot + k] = im
      row["image_valid"][first_slot + k] = True
      row["image_flow_loss"][first_slot + k] = nf
    start += len(e)
    first_slot += len(e.images)
  return row


class PretzelTransform:
  """The grain record transform: record -> one row (module docstring). Picklable: the tokenizer is
  loaded from `tokenizer_path` (anything `vlm.tokenizer.load_tokenizer` takes) in each process.

  seed: the caption-dropout seed (the training seed); the draw for example m of the record at stream
  position record[ELEMENT_KEY] (set by the training pipeline) is uniform(seed, element, m) <
  caption_dropout. Records without ELEMENT_KEY (held-out batches, direct calls) are never dropped.
  A record {"records": [...]} packs them: each example is built (and truncated) alone, then the row
  takes, in order, those that still fit (`first_fit`).
  """

  def __init__(self, spec: SequenceSpec, tokenizer_path: str, seed: int = 0):
    self.spec, self.tokenizer_path, self.seed = spec, tokenizer_path, int(seed)
    self._builder = None
    self.ids = self.builder.ids  # fails early (in the main process) on a tokenizer without specials

  @property
  def builder(self) -> SequenceBuilder:
    if self._builder is None:
      tk = tok_lib.load_tokenizer(self.tokenizer_path)
      tk.encode_special_tokens = True  # a caption's "<|im_end|>" is text, not a turn boundary
      self._builder = SequenceBuilder(self.spec, tk)
    return self._builder

  def __getstate__(self):
    return {**self.__dict__, "_builder": None}

  def __call__(self, record: dict) -> dict:
    element = record.get(ELEMENT_KEY)
    records = record[RECORDS_KEY] if RECORDS_KEY in record else [record]
    if len(records) > self.spec.pack:
      raise UserError(f"a record packs {len(records)} examples, more than data.pack={self.spec.pack}")
    drops = [False] * len(records)
    if element is not None and self.spec.caption_dropout > 0:
      drops = [np.random.default_rng([self.seed, int(element), _DROPOUT_STREAM, m]).random()
               < self.spec.caption_dropout for m in range(len(records))]
    examples = [self.builder.example(r, d) for r, d in zip(records, drops)]
    return pack(first_fit(examples, self.spec), self.spec, self.ids.pad)
