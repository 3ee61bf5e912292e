"""STARFlow2 end to end on ShapesWorld, on a laptop: `python -m launch.demo --workdir=DIR [--smoke]`.

Trains a tokenizer, a small Qwen2.5-architecture language model (the demo's frozen "pretrained VLM"),
the toy FAE and STARFlow2 stages 1, 2 and 3 (each an ordinary `launch.train` run in its own
subdirectory of DIR, its command printed), then generates images for held-out captions, answers
held-out questions and writes interleaved documents, scores them with the ShapesWorld detector and
prints the summary (also DIR/summary.json). Running it again resumes where it stopped. --smoke runs
every phase for a few steps (the test's size).
"""
from absl import flags

from starflow2_jax import entry
from starflow2_jax.errors import UserError

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
