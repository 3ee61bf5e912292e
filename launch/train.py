"""Train from a config file: `python -m launch.train --config=configs/<experiment>.py --workdir=DIR
[--config.field=value ...]`. Resumes from WORKDIR's latest checkpoint. Multi-process runs (TPU pods,
SLURM) are detected by `jax.distributed`; pass --coordinator/--num_processes/--process_id otherwise.
--compiled_step=FILE runs a step compiled ahead of time by `launch.compile --save=FILE`.
Library logs (orbax, grain, jax) below WARNING are shown when --verbosity is given (0: INFO, 1: DEBUG)."""
from absl import flags, logging
from ml_collections import config_flags

from starflow2_jax import entry
from starflow2_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and samples")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes (multi-process)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index (multi-process)")
_COMPILED_STEP = flags.DEFINE_string("compiled_step", None, "a train step saved by `launch.compile "
                                     "--save` for this config and slice: run it instead of compiling")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}: every option is a --flag")
  from starflow2_jax import parallel  # imported after flag parsing: grain workers spawn this module
  from starflow2_jax.train import loop
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  import jax
  if jax.process_index() != 0:  # absl logging from process 0; the others only warn
    logging.set_verbosity(logging.WARNING)
  summary = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value, compiled_step=_COMPILED_STEP.value)
  logging.info("done: %s", {k: v for k, v in summary.items() if k != "metrics"})


if __name__ == "__main__":
  entry.run(main)
