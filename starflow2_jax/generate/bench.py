"""Generation speed of a STARFlow2 config (the figures of issue 10): latency per image with sequential
and Jacobi decoding of the image span, and text tokens/s, at each batch size; medians of repeated
compiled runs (compilation excluded). The weights are the config's seeded init (speed does not depend
on them; Jacobi's iteration counts do, and are printed).

  python -m starflow2_jax.generate.bench --config=configs/starflow2_tiny.py --batch=1,8 --repeats=5
"""
from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from starflow2_jax import entry
from starflow2_jax.flows.sampling import Jacobi
from starflow2_jax.generate import loop, prompts
from starflow2_jax.generate.api import Generator

config_flags.DEFINE_config_file("config", None, "A STARFlow2 experiment config.")
flags.DEFINE_list("batch", ["1", "8"], "Batch sizes.")
flags.DEFINE_integer("repeats", 5, "Timed runs per figure (the median is reported).")
flags.DEFINE_integer("text_tokens", 64, "Text tokens generated for the tokens/s figure.")
flags.DEFINE_integer("jacobi_block", 16, "Jacobi block size.")
flags.DEFINE_float("jacobi_threshold", 1e-3, "Jacobi threshold.")
flags.DEFINE_integer("jacobi_max_iter", 32, "Jacobi iteration limit per chunk.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def _median_seconds(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def measure(gen: Generator, batch: int, repeats: int, text_tokens: int, jacobi: Jacobi) -> dict:
  cfg, sp = gen.cfg, gen.cfg.specials
  n = cfg.num_latents
  key = jax.random.key(0)
  rows = [prompts.prompt_tokens(gen.builder, "text_to_image", "a red circle")] * batch
  t2i = prompts.with_input_latents(prompts.batch(gen.builder, rows, n + 1 + len(rows[0]), n + 1),
                                   cfg.token_dim)
  out = {"batch": batch}
  for name, jac in (("sequential", None), ("jacobi", jacobi)):
    g = loop.GenerateConfig(specials=sp, max_new_tokens=n + 1, max_images=1, stop_after_images=1,
                            jacobi=jac)
    run = lambda g=g: loop.jitted_generate(gen.model, gen.vlm, g, gen.params, gen.vlm_params, t2i,  # noqa
                                           key, batch)
    out[f"image_s_{name}"] = _median_seconds(run, repeats)
    if jac is not None:
      iters = np.asarray(run()["jacobi_iters"])
      out["jacobi_iters"] = iters[iters >= 0].tolist()
  rows = [prompts.prompt_tokens(gen.builder, "interleaved", "describe a scene")] * batch
  txt = prompts.with_input_latents(prompts.batch(gen.builder, rows, text_tokens + len(rows[0]),
                                                 text_tokens), cfg.token_dim)
  # greedy text; a row may stop early at a stop id, so the figure counts the tokens produced
  g = loop.GenerateConfig(specials=sp, max_new_tokens=text_tokens, max_images=0)
  run = lambda: loop.jitted_generate(gen.model, gen.vlm, g, gen.params, gen.vlm_params, txt,  # noqa
                                     key, batch)
  produced = int(np.sum(np.asarray(run()["lengths"])))
  out["text_tokens"] = produced
  out["text_tokens_per_s"] = produced / _median_seconds(run, repeats)
  return out


def main(argv):
  del argv
  gen = Generator.build(FLAGS.config)
  jac = Jacobi(FLAGS.jacobi_block, FLAGS.jacobi_threshold, FLAGS.jacobi_max_iter)
  for b in FLAGS.batch:
    print(json.dumps(measure(gen, int(b), FLAGS.repeats, FLAGS.text_tokens, jac)), flush=True)


if __name__ == "__main__":
  entry.run(main)
