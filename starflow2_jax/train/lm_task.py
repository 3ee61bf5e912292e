"""The language-model task (`model_kind: lm`): a Qwen2.5-VL-architecture model (`vlm.model.Qwen2_5_VL`,
`config.model` = its QwenConfig fields, with or without a vision tower) pretrained by next-token
prediction on chat-formatted ShapesWorld scenes; its export is the frozen VLM of the STARFlow2 demo
(`config.vlm.checkpoint`).

Records: ShapesWorld records (data.name = "shapesworld": image, caption, questions, answers). Each
record becomes one chat conversation in the Qwen2.5 template of the Pretzel sequences (STARFLOW2.md 4.2;
system turn data.system_prompt), of a form drawn from (train.seed, the record's stream position;
held-out records: its caption), where a scene appears as a vision span (the place the Pretzel sequences
put an image's latents): with a vision tower (model.vision) the image itself,
`<|vision_start|><|image_pad|> x n<|vision_end|>` filled with the tower's n merged image tokens (a
vision-language model, as Qwen2.5-VL); without one (a text-only model), by `config.lm.scene`:
  "map"      its scene map (`data.shapesworld.scene_map`): one word per cell of the lm.scene_grid x
             lm.scene_grid token grid, at that grid's M-RoPE positions, as a vision tower's tokens
             would sit (the tokenizer must have `MAP_WORDS`: the toy tokenizer does);
  "caption"  its caption (`<|vision_start|>caption<|vision_end|>`, 1-D positions).
The forms:
  qa           user: [scene] question          assistant: answer
  caption      user: [scene] CAPTION_QUESTION  assistant: caption
  draw         user: caption                   assistant: [scene]
  document     user: prompt                    assistant: the STARFlow2 demo's interleaved document
               (`pretzel.examples.shapes_interleaved`: "here is a large red circle:[scene] and here it is
               above ...:[scene]"; a one-shape scene continues with a scene drawn from the training split)
so the language model learns the chat template, the caption grammar, answering from a scene span,
opening a vision span when asked to draw and the text around a document's images; `config.lm.forms`
weighs the forms (a vision tower sees one image per record: no document form).

Batch (`ChatRows`, L = data.max_len): tokens, targets (tokens shifted left within a conversation, pad at
its end) int32 [b, L], target_mask bool [b, L] (assistant text, its closing <|im_end|> and an assistant
span's <|vision_start|> and caption or map words (map words unless lm.map_targets is false); never image
tokens, the forced <|vision_end|>, system or user tokens, pads), positions int32 [b, L, 3] (M-RoPE: text
1-D on the three axes, an image span or a map on its grid, restarting at 0 in each conversation; pads
0), segment_ids int32 [b, L] (1, 2, ... per conversation, 0 = pad: attention stays inside a
conversation); with a vision tower also patches float32 [b, N, C*T*P*P] (the record's image as Qwen's
processor patchifies it, CLIP-normalised, at data.image_size) and image_index int32 [b, L] (the k-th
image token of the row at its k-th <|image_pad|>, -1 elsewhere).
Packing (data.pack > 1, text-only models): a packed record's conversations fill the row longest first,
each one that still fits (so that long ones, the interleaved documents, are seldom the ones left out);
a conversation longer than the row is an error.

Loss: "ntp" = (sum over supervised tokens of -log softmax(logits)[target], their count) (`pretzel.loss.
text_ce`; logit rows past the tokenizer's vocabulary never predicted). Held-out: text_ce (nats/token,
perplexity = exp(text_ce)), token_accuracy (greedy next-token) and answer_exact (the fraction of
conversations with every supervised token right). Parameter groups: the model's top-level modules
(embed_tokens, layers, norm, lm_head, visual). The export (WORKDIR/params_<step>/, {"params": the Qwen
tree} with this config) loads with `vlm.chat.load_vlm`; STARFlow2 drops its vision tower (the flow
stream's adapter replaces it).
"""
from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from starflow2_jax.data import pipeline, shapesworld
from starflow2_jax.data.pipeline import ELEMENT_KEY, RECORDS_KEY
from starflow2_jax.errors import UserError
from starflow2_jax.pretzel.examples import CAPTION_QUESTION, shapes_interleaved
from starflow2_jax.pretzel.loss import text_ce
from starflow2_jax.pretzel.tokens import SpecialTokens, special_tokens
from starflow2_jax.train.pretzel_task import tokenizer_path
from starflow2_jax.train.task import Task
from starflow2_jax.vlm import tokenizer as tok_lib
from starflow2_jax.vlm.model import Qwen2_5_VL, QwenConfig
from starflow2_jax.vlm.positions import mrope_positions
from starflow2_jax.vlm.vision import VisionConfig, preprocess_image

FORMS = ("qa", "caption", "draw", "document")
SCENES = ("map", "caption")  # how a text-only model reads a scene (config.lm.scene)
_FORM_STREAM = 3  # sub-stream of the (seed, element, stream) draws (the pipeline's flip is 1)


def lm_defaults() -> ml_collections.ConfigDict:
  """config.lm: the weight of each conversation form and how a text-only model reads a scene (module
  docstring; scene_grid: the map's side, the STARFlow2 flow's token grid; map_targets: whether the map
  words an assistant draws are targets)."""
  # the loss is token-level, and a document supervises ~90 tokens, an answer 1-2: answers need the weight.
  # map_targets: with the defaults the demo's model does not read the question's word (from true scene
  # maps: colour / kind 75% / 77%, one answer to "what shape is X?" for every X in 97% of the scenes);
  # map_targets false and qa 16 read it (91% / 100%) but made the whole demo worse (README's demo
  # section, "Understanding is limited ...": prompt following 62% -> 47%, QA kind via the adapter 50% -> 52%)
  return ml_collections.ConfigDict({"forms": {"qa": 4.0, "caption": 1.0, "draw": 2.0, "document": 1.0},
                                    "map_targets": True,
                                    "scene": "map", "scene_grid": 4})


def _form_weights(lm: ml_collections.ConfigDict) -> np.ndarray:
  weights = dict(lm.forms)
  unknown = sorted(set(weights) - set(FORMS))
  w = np.array([float(weights.get(f, 0.0)) for f in FORMS])
  if unknown or np.any(w < 0) or not w.sum() > 0:
    raise UserError(f"lm.forms={weights}: expected non-negative weights of the forms {FORMS}, at least "
                    "one positive")
  return w / w.sum()


class ChatRows:
  """The grain record transform: a ShapesWorld record, or a packed record of up to `pack` of them -> one
  chat row (module docstring). Picklable: the tokenizer is loaded from `tokenizer_path` in each process.
  vision: the tower's config (scenes as images of side image_size; one record per row) or None (scenes
  as `scene`: "map" on a scene_grid side grid, or "caption")."""

  def __init__(self, tokenizer_path: str, max_len: int, system_prompt: str | None, forms: np.ndarray,
               seed: int, vision: VisionConfig | None = None, image_size: int = 0, scene: str = "caption",
               scene_grid: int = 0, world: shapesworld.ShapesWorldSource | None = None, pack: int = 1,
               map_targets: bool = True):
    self.tokenizer_path, self.max_len, self.system = tokenizer_path, int(max_len), system_prompt
    self.p, self.seed, self.world, self.pack = np.asarray(forms, np.float64), int(seed), world, int(pack)
    if self.pack > 1 and vision is not None:
      raise UserError(f"data.pack={self.pack}: a row of the lm task with a vision tower holds one image "
                      "(one record); set data.pack=1")
    self.vision, self.image_size, self.map_targets = vision, int(image_size), bool(map_targets)
    self.scene, self.scene_grid = ("image", 0) if vision is not None else (scene, int(scene_grid))
    if vision is not None:
      self.grid = image_grid(vision, self.image_size)
    else:
      self.grid = (self.scene_grid, self.scene_grid) if scene == "map" else None
    if self.p[FORMS.index("document")] > 0 and (vision is not None or world is None):
      raise UserError("lm.forms has 'document' (several scenes per conversation): it needs a text-only "
                      "model (no model.vision) and a ShapesWorld training split to draw scenes from; set "
                      "lm.forms.document=0")
    self._tk = None
    self.ids: SpecialTokens = special_tokens(self.tokenizer)  # fails early on a tokenizer without them
    self.map_ids = self._map_ids() if self.scene == "map" else None

  @property
  def tokenizer(self):
    if self._tk is None:
      self._tk = tok_lib.load_tokenizer(self.tokenizer_path)
      self._tk.encode_special_tokens = True  # a caption's "<|im_end|>" is text, not a turn boundary
    return self._tk

  def __getstate__(self):
    return {**self.__dict__, "_tk": None}

  def _map_ids(self) -> dict[str, int]:
    vocab = self.tokenizer.get_vocab(with_added_tokens=True)
    missing = [w for w in shapesworld.MAP_WORDS if w not in vocab]
    if missing:
      raise UserError(f"lm.scene='map' needs the scene-map words as tokens, but {self.tokenizer_path} lacks "
                      f"{len(missing)} of them (e.g. {missing[0]!r}); use a tokenizer trained by "
                      "pretzel.toy_tokenizer.train_shapesworld_tokenizer, or lm.scene='caption'")
    return {w: int(vocab[w]) for w in shapesworld.MAP_WORDS}

  def _encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text, add_special_tokens=False).ids) if text else []

  def _rng(self, record: dict, m: int) -> np.random.Generator:
    key = record.get(ELEMENT_KEY)
    if key is None:  # held out: a fixed draw per record
      key = zlib.crc32(str(record["caption"]).encode("utf-8"))
    return np.random.default_rng([self.seed, int(key), _FORM_STREAM, int(m)])

  def turns(self, record: dict, m: int = 0) -> list[tuple[str, list]]:
    """[(role, parts)] of the record, the m-th of its row (its form and question drawn from (seed,
    record[ELEMENT_KEY] or, held out, its caption, m)): a part is a str or ("scene", record) (a vision
    span showing the record's scene)."""
    rng = self._rng(record, m)
    form = FORMS[int(rng.choice(len(FORMS), p=self.p))]
    caption = str(record["caption"])
    scene = ("scene", record)
    if form == "qa":
      k = int(rng.integers(len(record["questions"])))
      return [("user", [scene, str(record["questions"][k])]), ("assistant", [str(record["answers"][k])])]
    if form == "caption":
      return [("user", [scene, CAPTION_QUESTION]), ("assistant", [caption])]
    if form == "draw":
      return [("user", [caption]), ("assistant", [scene])]
    shapes = list(record["shapes"])
    more = self.world.scene(int(rng.integers(len(self.world)))) if len(shapes) == 1 else []
    prompt, parts, scenes = shapes_interleaved(shapes, more)
    views = [{"shapes": sc, "caption": shapesworld.ShapesWorldSource.caption(sc)} for sc in scenes]
    said = [p if isinstance(p, str) else ("scene", views[p]) for p in parts]
    return [("user", [prompt]), ("assistant", said)]

  def tokens(self, turns) -> tuple[np.ndarray, np.ndarray]:
    """-> (ids int32 [n], supervised bool [n]: predicting this token is supervised)."""
    ids = self.ids
    full = ([("system", [self.system])] if self.system is not None else []) + list(turns)
    out: list[tuple[list[int], bool]] = []
    for t, (role, parts) in enumerate(full):
      sup = role == "assistant"
      out.append(([ids.im_start, *self._encode(f"{role}\n")], False))
      for p in parts:
        if isinstance(p, str):
          out.append((self._encode(p), sup))
        else:
          out += [([ids.vision_start], sup), self._scene(p[1], sup), ([ids.vision_end], False)]
      out.append(([ids.im_end], sup))
      if t + 1 < len(full):
        out.append((self._encode("\n"), False))
    tokens = np.concatenate([np.asarray(p, np.int32) for p, _ in out])
    supervised = np.concatenate([np.full(len(p), s, bool) for p, s in out])
    return tokens, supervised

  def _scene(self, record: dict, sup: bool) -> tuple[list[int], bool]:
    """A scene span's inside: (its ids, supervised); image tokens are inputs, never targets, map words
    are targets where the assistant draws them unless lm.map_targets is false (`lm_defaults`)."""
    if self.scene == "image":
      return [self.ids.image_pad] * (self.grid[0] * self.grid[1]), False
    if self.scene == "map":
      words = shapesworld.scene_map(record["shapes"], self.scene_grid)
      return [self.map_ids[w] for w in words], sup and self.map_targets
    return self._encode(str(record["caption"])), sup

  def conversation(self, record: dict, m: int = 0) -> dict:
    """The record's conversation (the m-th of its row), unpadded: tokens, targets, target_mask [n],
    positions [n, 3] (row fields of the module docstring)."""
    tokens, supervised = self.tokens(self.turns(record, m))
    n = len(tokens)
    if n > self.max_len:
      raise UserError(f"a conversation of {n} tokens does not fit data.max_len={self.max_len}: raise "
                      "data.max_len")
    targets = np.append(tokens[1:], np.int32(self.ids.pad))
    grids = [self.grid] * int(np.sum(tokens == self.ids.vision_start)) if self.grid is not None else []
    spatial = tokens
    if self.scene == "map":  # the map's words sit on the grid, as image tokens
      spatial = np.where(np.isin(tokens, list(self.map_ids.values())), self.ids.image_pad, tokens)
    positions = mrope_positions(spatial[None], None, grids, self.ids.image_pad)[0][0]
    return {"tokens": tokens, "targets": targets, "target_mask": np.append(supervised[1:], False),
            "positions": positions}

  def row(self, conversations: list[dict]) -> dict:
    """`conversation`s -> one right-padded row (segment m + 1 = conversations[m]); they must fit."""
    length, pad = self.max_len, self.ids.pad
    row = {"tokens": np.full(length, pad, np.int32), "targets": np.full(length, pad, np.int32),
           "target_mask": np.zeros(length, bool), "positions": np.zeros((length, 3), np.int32),
           "segment_ids": np.zeros(length, np.int32)}
    start = 0
    for seg, conv in enumerate(conversations, 1):
      sl = slice(start, start + len(conv["tokens"]))
      for k, v in conv.items():
        row[k][sl] = v
      row["segment_ids"][sl] = seg
      start = sl.stop
    return row

  def __call__(self, record: dict) -> dict:
    records = record[RECORDS_KEY] if RECORDS_KEY in record else [record]
    if len(records) > self.pack:
      raise UserError(f"a record packs {len(records)} records, more than data.pack={self.pack}")
    element = {ELEMENT_KEY: record[ELEMENT_KEY]} if ELEMENT_KEY in record else {}
    convs = [self.conversation({**r, **element}, m) for m, r in enumerate(records)]
    chosen, used = [], 0
    for conv in sorted(convs, key=lambda c: -len(c["tokens"])):  # longest first, each that still fits
      if used + len(conv["tokens"]) <= self.max_len:
        chosen.append(conv)
        used += len(conv["tokens"])
    row = self.row(chosen)
    if self.scene == "image":
      image = np.asarray(record["image"], np.uint8)
      if image.shape != (self.image_size, self.image_size, 3):
        raise UserError(f"lm task with a vision tower: expected {self.image_size}x{self.image_size} RGB "
                        f"images (data.image_size), found shape {list(image.shape)}")
      pixels = self.image_size ** 2  # Qwen's processor at exactly this size: no resize
      row["patches"] = preprocess_image(Image.fromarray(image), self.vision, pixels, pixels)[0]
      is_image = row["tokens"] == self.ids.image_pad
      row["image_index"] = np.full(self.max_len, -1, np.int32)
      row["image_index"][is_image] = np.arange(int(is_image.sum()), dtype=np.int32)
    return row


def image_grid(vision: VisionConfig, image_size: int) -> tuple[int, int]:
  """The language-model grid (h, w) of merged image tokens of an image_size square image."""
  factor = vision.patch_size * vision.spatial_merge_size
  if image_size <= 0 or image_size % factor:
    raise UserError(f"data.image_size={image_size}: the vision tower (patch_size {vision.patch_size} x "
                    f"spatial_merge_size {vision.spatial_merge_size}) needs a positive multiple of {factor}")
  return image_size // factor, image_size // factor


def _check(config: ml_collections.ConfigDict, qcfg: QwenConfig, vocab: int) -> None:
  if config.data.name != "shapesworld":
    raise UserError(f"data.name={config.data.name!r}: the lm task reads ShapesWorld text; set "
                    "data.name='shapesworld'")
  scene = config.lm.get("scene", "caption")
  if scene not in SCENES:
    raise UserError(f"lm.scene={scene!r}: expected one of {SCENES}")
  if scene == "map" and qcfg.vision is None and int(config.lm.get("scene_grid", 0)) < 1:
    raise UserError(f"lm.scene='map' needs lm.scene_grid >= 1 (the map's side), found "
                    f"{config.lm.get('scene_grid', 0)}")
  if vocab > qcfg.vocab_size:
    raise UserError(f"the tokenizer ({config.tokenizer}) has {vocab} tokens, but model.vocab_size is "
                    f"{qcfg.vocab_size}; set model.vocab_size >= {vocab}")
  if qcfg.vision is not None:
    image_grid(qcfg.vision, int(config.data.image_size))
    if qcfg.vision.out_hidden_size != qcfg.hidden_size:
      raise UserError(f"model.vision.out_hidden_size={qcfg.vision.out_hidden_size}: the image tokens enter "
                      f"the language model, so it must equal model.hidden_size={qcfg.hidden_size}")


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules) -> Task:
  del mesh, rules  # no frozen subtree; the loop shards the parameters
  qcfg = QwenConfig.from_config(config.model)
  tk_path = tokenizer_path(config.tokenizer)
  tokenizer = tok_lib.load_tokenizer(tk_path)
  vocab = tokenizer.get_vocab_size(with_added_tokens=True)
  _check(config, qcfg, vocab)
  model = Qwen2_5_VL(qcfg)
  vision = qcfg.vision
  transform = ChatRows(tk_path, int(config.data.max_len), config.data.system_prompt,
                       _form_weights(config.lm), int(config.train.seed), vision, int(config.data.image_size),
                       config.lm.get("scene", "caption"), int(config.lm.get("scene_grid", 0)),
                       shapesworld.from_config(config.data, "train"), pipeline.pack_size(config.data),
                       bool(config.lm.get("map_targets", True)))

  def init_fn(rng):
    return model.init(rng, jnp.zeros((1, 1), jnp.int32), positions=jnp.zeros((1, 1, 3), jnp.int32),
                      method=Qwen2_5_VL.init_all)["params"]

  def image_inputs(params, batch) -> dict:
    """The vision tower's tokens of every row's image and where they go (module docstring)."""
    if vision is None:
      return {}
    b = batch["patches"].shape[0]
    h, w = transform.grid
    m = vision.spatial_merge_size
    # image by image (vmap): the tower's attention over one image's patches, not a masked [b N, b N] one
    embeds = jax.vmap(lambda p: model.apply({"params": params}, p, ((1, h * m, w * m),),
                                            method=Qwen2_5_VL.encode_images))(batch["patches"])
    embeds = embeds.reshape(b * h * w, -1)  # [b * h * w, d], row-major over the batch
    index = batch["image_index"]
    return {"image_embeds": embeds,
            "image_index": jnp.where(index >= 0, index + h * w * jnp.arange(b)[:, None], -1)}

  def per_token(params, batch):
    """-> (CE [b, L], greedy prediction right [b, L], supervised [b, L])."""
    logits = model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"], **image_inputs(params, batch))["logits"]
    ce = text_ce(logits, batch["targets"], vocab)
    guess = jnp.argmax(jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, -jnp.inf), axis=-1)
    return ce, guess == batch["targets"], batch["target_mask"]

  def loss_fn(params, frozen, batch, rng):
    del frozen, rng
    ce, _, mask = per_token(params, batch)
    return {"ntp": (jnp.sum(jnp.where(mask, ce, 0.0)), jnp.maximum(jnp.sum(mask, dtype=jnp.float32), 1.0))}

  def eval_fn(params, frozen, batch, rng):
    """Per row: text_ce and token_accuracy as (sum, count) over its supervised tokens; answer_exact as
    (its conversations with every supervised token right, its conversations)."""
    del frozen, rng
    ce, right, mask = per_token(params, batch)
    count = jnp.sum(mask, axis=1, dtype=jnp.float32)
    segments = jnp.arange(1, pipeline.pack_size(config.data) + 1)[:, None, None]  # [S, 1, 1]
    in_seg = batch["segment_ids"][None] == segments  # [S, b, L]
    exact = jnp.all(right | ~mask | ~in_seg, axis=2) & jnp.any(in_seg, axis=2)  # [S, b]
    return {"text_ce": (jnp.sum(jnp.where(mask, ce, 0.0), axis=1), count),
            "token_accuracy": (jnp.sum(right & mask, axis=1, dtype=jnp.float32), count),
            "answer_exact": (jnp.sum(exact, axis=0, dtype=jnp.float32),
                             jnp.sum(jnp.any(in_seg, axis=2), axis=0, dtype=jnp.float32))}

  return Task(record_transform=transform, init_fn=init_fn, loss_fn=loss_fn, objective={"ntp": 1.0},
              eval_fn=eval_fn, sample_fn=None,
              param_labels=lambda params: {k: jax.tree.map(lambda _, n=k: n, v) for k, v in params.items()},
              headline="ntp", tokens_per_example=int(config.data.max_len), packs=True)
