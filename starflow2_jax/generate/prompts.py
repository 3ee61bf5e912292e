"""Generation prompts: the Qwen chat templates of the training sequences (STARFLOW2.md 4.2, 7.1, 7.8,
7.9), cut where the assistant's output begins, and left-padded batches of them.

Every prompt is built by `pretzel.sequence.SequenceBuilder` from the record the training data would
hold, so generation sees exactly the training tokenisation (system turn, headers, newlines):
  text_to_image  ... <|im_start|>assistant\\n<|vision_start|>      (the row starts in image mode)
  understanding  ... user\\n<|vision_start|>[N latents]<|vision_end|>{question}<|im_end|>\\n
                 <|im_start|>assistant\\n
  interleaved    ... user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n
The null prompt (guidance) is the same template with the user text replaced by the empty string (user
images kept): the caption-dropout template of training.

`batch(...)` -> the arrays `generate.loop.generate` takes (R rows, L the longest prompt, optionally
rounded up to a bucket):
  tokens [R, L] int32, valid [R, L] bool (False: left pads), positions [R, L, 3] (vlm.positions; pads 0),
  is_image [R, L], image_slot / image_cell [R, L] (-1 at text), next_position [R],
  u [R, L, D] (the input images' latents at their positions; `with_input_latents`).
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from starflow2_jax.errors import UserError
from starflow2_jax.pretzel.sequence import SequenceBuilder
from starflow2_jax.vlm.positions import mrope_positions

KINDS = ("text_to_image", "understanding", "interleaved")


def prompt_tokens(builder: SequenceBuilder, kind: str, text: str, null: bool = False) -> np.ndarray:
  """One prompt's ids [n] (int32). kind: one of KINDS; text: the caption, question or prompt; null: the
  null template (the user text dropped)."""
  if kind not in KINDS:
    raise ValueError(f"prompt kind must be one of {KINDS}, got {kind!r}")
  size = builder.spec.image_size
  blank = np.zeros((size, size, 3), np.uint8)
  text = "" if null else text
  if kind == "text_to_image":
    record = {"kind": kind, "caption": text, "images": [blank]}
    cut = builder.spec.num_latents + 2  # [latents] <|vision_end|> <|im_end|>
  elif kind == "understanding":
    record = {"kind": kind, "question": text, "answer": "", "images": [blank]}
    cut = 1  # the closing <|im_end|> of the (empty) answer
  else:
    record = {"kind": kind, "prompt": text, "parts": [], "images": []}
    cut = 1
  return builder.example(record).tokens[:-cut]


def batch(builder: SequenceBuilder, prompts: Sequence[np.ndarray], cache_len: int,
          max_new_tokens: int, bucket: int = 1) -> dict:
  """Left-padded batch of prompts (each [n] ids) -> the module docstring's arrays (numpy), L the
  longest prompt rounded up to a multiple of `bucket` (at most cache_len - max_new_tokens), so that
  requests of similar lengths share one compiled generator (pads are masked keys).
  UserError when the longest prompt plus max_new_tokens does not fit cache_len positions."""
  ids = builder.ids
  longest = max(len(p) for p in prompts)
  if longest + max_new_tokens > cache_len:
    raise UserError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} needs "
                    f"{longest + max_new_tokens} cache positions, more than sample.cache_len={cache_len}"
                    ": shorten the prompt, lower max_new_tokens or raise sample.cache_len")
  longest = min(-(-longest // bucket) * bucket, cache_len - max_new_tokens)
  r = len(prompts)
  tokens = np.full((r, longest), ids.pad, np.int32)
  valid = np.zeros((r, longest), bool)
  for k, p in enumerate(prompts):
    tokens[k, longest - len(p):] = p
    valid[k, longest - len(p):] = True
  is_image = (tokens == ids.image_pad) & valid
  n = builder.spec.num_latents
  spans = int(is_image.sum()) // n
  positions, next_pos = mrope_positions(tokens, valid, [builder.spec.grid] * spans, ids.image_pad,
                                        builder.spec.image_positions)
  slot = np.full((r, longest), -1, np.int32)
  cell = np.full((r, longest), -1, np.int32)
  for k in range(r):
    where = np.nonzero(is_image[k])[0]
    slot[k, where] = np.arange(len(where)) // n
    cell[k, where] = np.arange(len(where)) % n
  return {"tokens": tokens, "valid": valid, "positions": positions, "is_image": is_image,
          "image_slot": slot, "image_cell": cell, "next_position": next_pos}


def with_input_latents(prompt: dict, dim: int, u_images=None) -> dict:
  """prompt (jnp arrays) + "u" [R, L, D]: row k's latent (slot, cell) of u_images [R, P, N, D] at its
  image positions, zeros elsewhere (u_images None: a prompt without images)."""
  out = {k: jnp.asarray(v) for k, v in prompt.items()}
  r, length = prompt["tokens"].shape
  if u_images is None:
    if np.asarray(prompt["is_image"]).any():
      raise ValueError("this prompt holds image spans: pass their latents u_images [R, P, N, D]")
    out["u"] = jnp.zeros((r, length, dim), jnp.float32)
    return out
  u_images = jnp.asarray(u_images)
  _, p, n, d = u_images.shape
  flat = u_images.reshape(r, p * n, d)
  idx = jnp.asarray(np.maximum(prompt["image_slot"] * n + prompt["image_cell"], 0))
  u = jnp.take_along_axis(flat, idx[..., None], axis=1)
  out["u"] = jnp.where(out["is_image"][..., None], u, 0.0)
  return out


def full_sequence(prompt: dict, result: dict, u_images=None) -> tuple[dict, object]:
  """The generated sequence, as teacher-forcing inputs: prompt + generated positions (R rows; the
  generated tokens appended identically to both halves) -> (pretzel.model INPUT_KEYS arrays, u
  [R, P + I, N, D]: the prompt's input images, then the generated ones)."""
  rows = prompt["tokens"].shape[0]
  b = result["tokens"].shape[0]
  dup = lambda a: np.concatenate([a] * (rows // b))  # noqa: E731
  res = {k: np.asarray(v) for k, v in result.items()}
  p = 0 if u_images is None else np.asarray(u_images).shape[1]
  valid = np.concatenate([np.asarray(prompt["valid"]), dup(res["valid"])], 1)
  gen_slot = np.where(res["is_image"], res["image_slot"] + p, -1)
  inputs = {
      "tokens": np.concatenate([np.asarray(prompt["tokens"]), dup(res["tokens"])], 1),
      "positions": np.concatenate([np.asarray(prompt["positions"]), res["positions"]], 1),
      "segment_ids": valid.astype(np.int32),
      "is_image": np.concatenate([np.asarray(prompt["is_image"]), dup(res["is_image"])], 1),
      "image_slot": np.concatenate([np.asarray(prompt["image_slot"]), dup(gen_slot)], 1),
      "image_cell": np.concatenate([np.asarray(prompt["image_cell"]), dup(res["image_cell"])], 1)}
  lat = dup(res["latents"])
  u = lat if u_images is None else np.concatenate([np.asarray(u_images), lat], 1)
  return {k: jnp.asarray(v) for k, v in inputs.items()}, jnp.asarray(u)
