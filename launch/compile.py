"""Compile a config's train step ahead of time for a TPU slice (on any machine) and report its cost:

  python -m launch.compile --config=configs/tarflow_imagenet64.py --topology=v5p-64 \
      [--config.train.batch_size=512 ...] [--save=/tmp/step.pkl] [--json=/tmp/report.json]

--topology: a Cloud TPU name (v5p-64 = 32 chips: v4 and v5p count TensorCores, v5e and v6e chips),
an explicit chip grid (v5p:2x4x4, v5e:16x16), or cpu / cpu:N (this host's devices). TPU targets need
libtpu (`pip install -e '.[tpu]'`); no TPU is used. Nothing is allocated: parameters, optimizer
state, the frozen subtree and the batch are abstract, sharded on the config's mesh over the slice.

Prints per-chip memory (arguments, outputs, temporaries, total against HBM), whether it fits (the
largest buffers when not), compiled and analytical FLOPs per step and their ratio, and the step time
and examples/s at the chip's peak and at 50% of it (arithmetic, not a measurement).
--save=FILE writes the compiled step; `launch.train --compiled_step=FILE` on that slice runs it.
STARFlow2 configs (model_kind starflow2) also compile their generation step (`scale.generation`: one
decode step of both streams with the VLM and deep KV caches, --gen_batch conversations) and print its
per-chip memory and FLOPs per generated token and image; --nogeneration skips it, --notrain compiles
the generation step alone.
Exit status 0 when the steps fit (or the fit is unknown), 3 when one does not.
"""
import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from starflow2_jax import entry
from starflow2_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=False)
_TOPOLOGY = flags.DEFINE_string("topology", None, "v5p-64, v5e-256, v4-128, v6e-64, v5p:2x4x4, cpu[:N]")
_SAVE = flags.DEFINE_string("save", None, "write the compiled train step here (never overwritten)")
_JSON = flags.DEFINE_string("json", None, "write the report as JSON here (never overwritten)")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "per-chip memory (GiB) to check the step against; 0: the "
                              "chip's HBM (train.mfu's table; none for a CPU)")
_GENERATION = flags.DEFINE_bool("generation", True, "also compile the generation step (STARFlow2 configs)")
_TRAIN = flags.DEFINE_bool("train", True, "compile the train step (false: the generation step alone)")
_GEN_BATCH = flags.DEFINE_integer("gen_batch", 0, "conversations of the generation step; 0: one per "
                                  "data x fsdp shard of the mesh")
flags.mark_flags_as_required(["config", "topology"])
NO_FIT_EXIT = 3  # exit status when the step does not fit the chip's HBM


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}: every option is a --flag")
  for path in (_SAVE.value, _JSON.value):
    if path and os.path.exists(path):
      raise UserError(f"{path} exists; choose a new file name (outputs are never overwritten)")
  from starflow2_jax.scale import generation, report, saved
  config_name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
  if _HBM_GIB.value < 0:
    raise UserError(f"--hbm_gib={_HBM_GIB.value}: expected a positive size in GiB, or 0 for the chip's HBM")
  starflow2 = _CONFIG.value.get("model_kind") == generation.MODEL_KIND
  if not _TRAIN.value and not (starflow2 and _GENERATION.value):
    raise UserError("--notrain compiles the generation step alone: it needs a STARFlow2 config "
                    f"(model_kind {generation.MODEL_KIND!r}, found {_CONFIG.value.get('model_kind')!r}) "
                    "and --generation")
  if _SAVE.value and not _TRAIN.value:
    raise UserError(f"--save={_SAVE.value} writes the compiled train step: drop --notrain")
  rep, out = None, {}
  if _TRAIN.value:
    rep = report.compile_report(_CONFIG.value, _TOPOLOGY.value, config_name,
                                int(_HBM_GIB.value * report.GIB) or None)
    print(report.format_report(rep))
    out = rep.to_json()
  gen = None
  if _GENERATION.value and starflow2:
    gen = generation.compile_report(_CONFIG.value, _TOPOLOGY.value, config_name, _GEN_BATCH.value,
                                    int(_HBM_GIB.value * report.GIB) or None)
    print(generation.format_report(gen))
    out["generation"] = gen.to_json()
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=2)
  if _SAVE.value:
    if rep.compiled is None:
      raise UserError(f"--save={_SAVE.value}: the step does not fit {rep.topology}, nothing to save")
    print("saved the compiled step to", saved.save(_SAVE.value, rep.compiled, _CONFIG.value,
                                                   rep.plan.args, rep.plan.mesh))
  if (rep is not None and rep.fits is False) or (gen is not None and gen.fits is False):
    sys.exit(NO_FIT_EXIT)


if __name__ == "__main__":
  entry.run(main)
