"""STARFlow2 end to end on ShapesWorld, on a laptop: `python -m launch.demo --workdir=DIR [--smoke]`.

Trains a tokenizer, a small Qwen2.5-architecture language model (the demo's frozen "pretrained VLM"),
the toy FAE and STARFlow2 stages 1, 2 and 3 (each an ordinary `launch.train` run in its own
subdirectory of DIR, its command printed), then generates images for held-out captions, answers
held-out questions and writes interleaved documents, scores them with the ShapesWorld detector and
prints the summary (also DIR/summary.json). Running it again resumes where it stopped. --smoke runs
every phase for a few steps (the test's size).
"""
import os

# The demo's models are small, and on a laptop's CPU the Eigen thread pool XLA runs each op on waits at
# every op for all its threads: while the input pipeline's Python threads hold a core, the whole step
# waits. Without that pool (the ops run on one thread each) the lm phase runs 2x faster on 2 cores (8.5
# vs 4.0 steps/s) and stage 1 as fast (4.2 vs 4.2). An XLA_FLAGS that sets the flag itself is kept.
CPU_FLAG = "--xla_cpu_multi_thread_eigen=false"
if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_FLAG}".strip()

from absl import flags  # noqa: E402 (XLA_FLAGS first: the backend reads them when it starts)

from starflow2_jax import entry  # noqa: E402
from starflow2_jax.errors import UserError  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "directory of the demo's phases and outputs")
_SMOKE = flags.DEFINE_bool("smoke", False, "a few steps per phase: the whole pipeline in minutes")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}: every option is a --flag")
  from starflow2_jax.demo import run  # imported after flag parsing: grain workers spawn this module
  run.run(_WORKDIR.value, _SMOKE.value)


if __name__ == "__main__":
  entry.run(main)
