"""The GPU measurement of issue 12 in one call: the digits job and a ~1B-parameter flow in bf16, each
trained for a few steps by the real loop, with the step time and MFU against the chip's peak.

  python -m launch.gpu_check --workdir=/tmp/gpu_check [--parts=digits,flow1b] [--steps=60] \
      [--flow1b_batch=64] [--json=/tmp/gpu_check.json]

Parts (each a `launch.train` run in WORKDIR/<part>, built-in data, nothing downloaded):
  digits  configs/tarflow_digits.py as it is (float32, batch 64), --steps steps;
  flow1b  configs/tarflow_imagenet64.py widened to width 2048 (32 heads of 64), 5 blocks x 4 layers
          (about 1.0B parameters), bf16 trunk, full remat, patch 2 on 64 x 64 RGB ShapesWorld images
          (1024 tokens), batch --flow1b_batch, --steps steps.
Printed per part: parameters, the step time (the loop's steps/s after the first logging window, which
holds the compilation), MFU = analytical model FLOPs per step (`scale.model_flops`: 6ND + attention)
/ (step time x devices x the chip's bf16 peak from `train.mfu`'s table), and the loop's own `mfu`
(from the compiled step's matmuls, `scale.hlo_flops`, loops x trip counts). A chip missing
from the table gets no MFU. Outputs are never overwritten (WORKDIR/<part> must not exist).
"""
import json
import os
import time

from absl import flags, logging

from starflow2_jax import entry
from starflow2_jax.errors import UserError

PARTS = ("digits", "flow1b")
_WORKDIR = flags.DEFINE_string("workdir", None, "a new directory for the runs")
_PARTS = flags.DEFINE_list("parts", list(PARTS), f"which runs: {', '.join(PARTS)}")
_STEPS = flags.DEFINE_integer("steps", 60, "train steps per part")
_FLOW1B_BATCH = flags.DEFINE_integer("flow1b_batch", 64, "global batch of the 1B flow")
_JSON = flags.DEFINE_string("json", None, "also write the figures here (never overwritten)")
flags.mark_flags_as_required(["workdir"])
LOG_WINDOWS = 4  # logging windows per run: the first holds the compilation, the rest are timed
FLOW1B = {"model.width": 2048, "model.head_dim": 64, "model.layers_per_block": [4] * 5,
          "model.dtype": "bfloat16", "model.remat": "full", "model.num_classes": 10,
          "data.name": "shapesworld", "data.shapes_num_train": 4096, "data.shapes_num_test": 64,
          "mesh.shape": {"data": 1, "fsdp": -1, "tensor": 1}}


def _set(config, key: str, value) -> None:
  parent, _, field = key.rpartition(".")
  node = config
  for part in parent.split("."):
    node = node[part]
  node[field] = value


def part_config(part: str, steps: int, flow1b_batch: int):
  """The experiment config of one part, `steps` long, without samples, evaluation or mid-run saves."""
  from configs import tarflow_digits, tarflow_imagenet64
  if part == "digits":
    config, overrides = tarflow_digits.get_config(), {}
  elif part == "flow1b":
    config, overrides = tarflow_imagenet64.get_config(), dict(FLOW1B, **{"train.batch_size": flow1b_batch})
  else:
    raise UserError(f"--parts: {part!r} is not one of {PARTS}")
  overrides.update({"train.steps": steps, "train.warmup": 0, "log.every": max(1, steps // LOG_WINDOWS),
                    "log.sample_every": 0, "log.num_samples": 0, "log.eval_examples": 0,
                    "checkpoint.every": steps})
  with config.unlocked():
    for key, value in overrides.items():
      _set(config, key, value)
  return config


def measure(part: str, config, workdir: str) -> dict:
  """Train `config` in `workdir` and return its step time and MFU figures."""
  import jax
  from starflow2_jax.scale import abstract, model_flops
  from starflow2_jax.train import loop, mfu
  devices = jax.devices()
  plan = abstract.build(config, devices)
  flops = model_flops.train_step_flops(plan.config, plan.state.params, plan.trainable, plan.frozen,
                                       plan.task.tokens_per_example)
  t0 = time.perf_counter()
  summary = loop.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - t0
  sps = summary["steps_per_sec"]
  peak = mfu.chip_peak(devices[0].device_kind)
  step = 1.0 / sps if sps else None
  out = {"part": part, "device_kind": devices[0].device_kind, "devices": len(devices),
         "params": summary["params"], "batch": int(config.train.batch_size), "steps": summary["step"],
         "dtype": str(config.model.dtype), "step_seconds": step, "wall_seconds": wall,
         "analytical_flops_per_step": flops.total, "peak_flops_per_chip": peak,
         "mfu": flops.total / (step * len(devices) * peak) if step and peak else None,
         "loop_mfu": summary["metrics"].get("mfu"), "loss": summary["metrics"].get("loss")}
  return out


def _line(r: dict) -> str:
  step = f"{r['step_seconds'] * 1e3:.1f} ms" if r["step_seconds"] else "no timed window"
  mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "- (chip not in train.mfu's table)"
  loop_mfu = f"{r['loop_mfu']:.1%}" if r["loop_mfu"] is not None else "-"
  return (f"{r['part']}: {r['devices']} x {r['device_kind']}, {r['params'] / 1e6:,.1f} M params, "
          f"{r['dtype']}, batch {r['batch']}, {r['steps']} steps: step {step}, MFU {mfu} "
          f"(analytical {r['analytical_flops_per_step']:.4g} FLOPs per step; the loop's compiled-HLO mfu "
          f"{loop_mfu}), loss {r['loss']:.4g}, {r['wall_seconds']:.0f} s with compilation")


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}: every option is a --flag")
  if _STEPS.value < LOG_WINDOWS:
    raise UserError(f"--steps={_STEPS.value}: expected at least {LOG_WINDOWS} (one timed window after "
                    "the compiling one)")
  if _JSON.value and os.path.exists(_JSON.value):
    raise UserError(f"--json={_JSON.value} exists; choose a new file (figures are never overwritten)")
  configs = {p: part_config(p, _STEPS.value, _FLOW1B_BATCH.value) for p in _PARTS.value}
  for p in configs:
    if os.path.exists(os.path.join(_WORKDIR.value, p)):
      raise UserError(f"{os.path.join(_WORKDIR.value, p)} exists; choose a new --workdir")
  results = []
  for p, config in configs.items():
    logging.info("gpu_check: %s", p)
    results.append(measure(p, config, os.path.join(_WORKDIR.value, p)))
    print(_line(results[-1]), flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  entry.run(main)
