"""Tiny training configs for tests, and a subprocess runner with instrumentation.

  python tests/train_runner.py WORKDIR OVERRIDES_JSON [--pause_at=N] [--resume_file=F] [--log=F]
      [--coordinator=HOST:PORT --num_processes=P --process_id=I]

The runner trains `tiny_config()` (with overrides) through `loop.train_and_evaluate`. It records a
digest of every host batch it feeds (one JSON line per step, to --log), and with --pause_at=N it stops
before feeding step N's batch, writes WORKDIR/paused, and waits (for --resume_file, or forever) - so a
test can SIGKILL or SIGTERM it at a known point.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import ml_collections


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """The digits TarFlow shrunk to 8x8 images, width 32, 2 heads of 16, 2 blocks of 1 layer."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import tarflow_digits
  c = tarflow_digits.get_config()
  c.model.image_size = 8
  c.data.image_size = 8
  c.model.patch_size = 2
  c.model.width = 32
  c.model.head_dim = 16
  c.model.layers_per_block = [1, 1]
  c.train.batch_size = 16
  c.train.steps = 12
  c.train.warmup = 0
  c.train.lr = 1e-3
  c.checkpoint.every = 4
  c.checkpoint.keep = 3
  c.log.every = 1
  c.log.sample_every = 0
  c.log.num_samples = 0
  c.log.eval_examples = 0
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _digest(local: dict) -> str:
  h = hashlib.sha256()
  for k in sorted(local):
    h.update(k.encode())
    h.update(local[k].tobytes())
  return h.hexdigest()[:16]


def main(argv):
  import argparse
  ap = argparse.ArgumentParser()
  ap.add_argument("workdir")
  ap.add_argument("overrides")
  ap.add_argument("--pause_at", type=int, default=0)
  ap.add_argument("--resume_file", default="")
  ap.add_argument("--log", default="")
  ap.add_argument("--coordinator", default=None)
  ap.add_argument("--num_processes", type=int, default=None)
  ap.add_argument("--process_id", type=int, default=None)
  args = ap.parse_args(argv)

  import jax
  if args.coordinator:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  from starflow2_jax import parallel
  parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  from starflow2_jax.train import loop

  real = parallel.make_global_batch
  count = [0]

  def instrumented(local, mesh, global_batch):
    count[0] += 1
    if args.pause_at and count[0] == args.pause_at:
      with open(os.path.join(args.workdir, "paused"), "w") as f:
        f.write(str(os.getpid()))
      while not (args.resume_file and os.path.exists(args.resume_file)):
        time.sleep(0.05)
    if args.log:
      with open(args.log, "a") as f:
        f.write(json.dumps({"digest": _digest(local)}) + "\n")
    return real(local, mesh, global_batch)

  parallel.make_global_batch = instrumented
  summary = loop.train_and_evaluate(tiny_config(**json.loads(args.overrides)), args.workdir)
  if jax.process_index() == 0:
    with open(os.path.join(args.workdir, "summary.json"), "w") as f:
      json.dump({k: v for k, v in summary.items()}, f)


if __name__ == "__main__":
  main(sys.argv[1:])
