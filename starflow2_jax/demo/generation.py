"""The demo's requests to the STARFlow2 generator (`generate.api.Generator`), in fixed-size chunks (one
compilation per request kind; a short last chunk is padded with its last request and the padding
dropped), with a progress bar per request kind.

  gen = DemoGenerator(stage3_export, chunk=16)
  gen.text_to_image(captions) -> uint8 [n, S, S, 3]
  gen.answer(images uint8 [n, S, S, 3], questions) -> [str] (greedy)
  gen.document(prompt) -> [str | uint8 [S, S, 3]]: the generated text pieces and images, in order
Sampling settings are the checkpoint's config.sample (guidance, denoising, ...), as `launch.sample`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from starflow2_jax import logging_utils
from starflow2_jax.generate.api import Generator

MAX_PIXEL = 255.0


def to_uint8(image: np.ndarray) -> np.ndarray:
  """float [S, S, 3] in [0, 1] -> uint8."""
  return np.clip(np.round(np.asarray(image, np.float32) * MAX_PIXEL), 0, MAX_PIXEL).astype(np.uint8)


class DemoGenerator:
  def __init__(self, checkpoint: str, chunk: int = 16, seed: int = 0):
    self.gen = Generator.from_checkpoint(checkpoint)  # on the config's mesh: every local device
    self.chunk, self.seed = int(chunk), int(seed)
    self.image_size = self.gen.fae.image_size

  def _chunked(self, n: int, request: Callable[[np.ndarray, int], list]) -> list:
    """request(indices [chunk], chunk number) -> one result per index; over range(n) in chunks."""
    out, bar = [], logging_utils.Progress(n, 0)
    try:
      for c, start in enumerate(range(0, n, self.chunk)):
        idx = np.arange(start, min(n, start + self.chunk))
        padded = np.concatenate([idx, np.full(self.chunk - len(idx), idx[-1])])
        out += request(padded, c)[:len(idx)]
        bar.update(len(idx))
    finally:
      bar.close()
    return out

  def text_to_image(self, captions: Sequence[str]) -> np.ndarray:
    captions = list(captions)

    def request(idx, c):
      res = self.gen.run("text_to_image", [captions[i] for i in idx], seed=self.seed + c)
      return [to_uint8(row[0]) for row in res["images"]]
    return np.stack(self._chunked(len(captions), request))

  def answer(self, images: np.ndarray, questions: Sequence[str]) -> list[str]:
    questions = list(questions)

    def request(idx, c):
      res = self.gen.run("understanding", [questions[i] for i in idx], images=images[idx],
                         seed=self.seed + c, text_temperature=0.0)
      return [t.strip() for t in res["text"]]
    return self._chunked(len(questions), request)

  def document(self, prompt: str) -> list:
    res = self.gen.run("interleaved", [prompt], seed=self.seed)
    images = res["images"][0]
    return [p if isinstance(p, str) else to_uint8(images[p]) for p in res["parts"][0]]
