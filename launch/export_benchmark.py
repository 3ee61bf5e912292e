"""Images of a STARFlow2 checkpoint for GenEval or DPG-Bench, in the layouts their official scorers read
(`starflow2_jax.eval.export`); score them with the benchmark's own tools afterwards.

  # GenEval: prompts/evaluation_metadata.jsonl of djghosh13/geneval (553 prompts, 4 samples each)
  python -m launch.export_benchmark --benchmark=geneval --checkpoint=DIR \
      --prompts=geneval/prompts/evaluation_metadata.jsonl --out=/data/geneval_images [--num_samples=4]
  # DPG-Bench: dpg_bench/prompts/ of TencentQQGYLab/ELLA (one <name>.txt per prompt)
  python -m launch.export_benchmark --benchmark=dpg_bench --checkpoint=DIR \
      --prompts=ELLA/dpg_bench/prompts --out=/data/dpg_images [--num_samples=4]

--out must not exist (nothing is ever overwritten). Sampling settings are the checkpoint's config.sample;
--guidance, --temperature and --jacobi_block override them. The last line printed is the official
scoring command of the folder.
"""
from __future__ import annotations

from absl import flags

from starflow2_jax import entry
from starflow2_jax.demo.generation import DemoGenerator
from starflow2_jax.errors import UserError
from starflow2_jax.eval import export, metrics

flags.DEFINE_enum("benchmark", None, export.BENCHMARKS, "Which benchmark's prompts and layout.")
flags.DEFINE_string("checkpoint", None, "A STARFlow2 parameter checkpoint or training workdir.")
flags.DEFINE_string("prompts", None, "geneval: evaluation_metadata.jsonl; dpg_bench: the prompts folder.")
flags.DEFINE_string("out", None, "New directory of the images.")
flags.DEFINE_integer("num_samples", 4, "Samples per prompt (DPG-Bench: 1 to 4).")
flags.DEFINE_integer("batch_size", 16, "Text-to-image requests per generation call.")
flags.DEFINE_integer("seed", 0, "Seed of the first call (call c uses seed + c).")
flags.DEFINE_float("guidance", None, "Guidance weight (default: the checkpoint's config.sample).")
flags.DEFINE_float("temperature", None, "Image noise temperature (default: config.sample).")
flags.DEFINE_integer("jacobi_block", None, "Jacobi segment length of the image span (0: sequential).")
flags.mark_flags_as_required(["benchmark", "checkpoint", "prompts", "out"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}: every option is a --flag")
  if FLAGS.batch_size < 1 or FLAGS.num_samples < 1:
    raise UserError(f"--batch_size and --num_samples must be >= 1, got {FLAGS.batch_size} and "
                    f"{FLAGS.num_samples}")
  out = export.check_new_dir(FLAGS.out)
  if FLAGS.benchmark == "geneval":
    rows = export.read_geneval_prompts(FLAGS.prompts)
  else:
    rows = export.read_dpg_prompts(FLAGS.prompts)
    export.check_dpg_samples(FLAGS.num_samples)
  checkpoint = metrics.resolve_checkpoint(FLAGS.checkpoint)
  gen = DemoGenerator(checkpoint, chunk=FLAGS.batch_size)
  overrides = {k: getattr(FLAGS, k) for k in ("guidance", "temperature", "jacobi_block")
               if getattr(FLAGS, k) is not None}
  if FLAGS.benchmark == "geneval":
    export.export_geneval(gen, rows, out, num_samples=FLAGS.num_samples, seed=FLAGS.seed,
                          overrides=overrides, record={"checkpoint": checkpoint})
  else:
    export.export_dpg_bench(gen, rows, out, num_samples=FLAGS.num_samples, seed=FLAGS.seed,
                            overrides=overrides)
  print(f"wrote {len(rows)} prompts x {FLAGS.num_samples} samples to {out}")
  print("score it in a clone of the benchmark's repository:")
  print(export.scoring_command(FLAGS.benchmark, out, FLAGS.num_samples, gen.image_size))


if __name__ == "__main__":
  entry.run(main)
