"""Evaluate a checkpoint or generated outputs; results as JSON (never overwritten) and TensorBoard.

  # bits/dim of a pixel flow on its held-out split (uniform dequantisation, no flips, no labels)
  python -m launch.evaluate --checkpoint=WORKDIR_OR_PARAMS_DIR --metric=bpd [--num_examples=N]
  # latent NLL (nats/dim) of a latent flow on encoded held-out latents [N, h, w, C]
  python -m launch.evaluate --checkpoint=DIR --metric=nll --latents=heldout_latents.npy
  # FID: reference statistics of real images, then samples of a flow (or a PNG folder) against them;
  # FD-DINOv2 the same with --metric=fd_dinov2 --dinov2=DIR (launch.convert --from=hf_dinov2
  # --input_size=224) and --dinov2_ref_stats=FILE.npz in place of --ref_stats
  python -m launch.evaluate --metric=fid --inception=/ckpt/inception_fid --images=REAL_DIR \
      --save_stats=ref.npz
  python -m launch.evaluate --checkpoint=DIR --metric=fid --inception=/ckpt/inception_fid \
      --ref_stats=ref.npz --num_samples=50000        # or --samples=PNG_DIR instead of a checkpoint
  # ShapesWorld proxies of a STARFlow2 checkpoint: held-out captions -> images -> detector scores,
  # held-out questions -> greedy answers -> accuracy (the outputs land in OUT/shapes_t2i, OUT/shapes_qa)
  python -m launch.evaluate --checkpoint=DIR --metric=shapes [--num_captions=64] [--batch_size=16]
  python -m launch.evaluate --checkpoint=DIR --metric=qa [--num_scenes=32]
  # ... or on outputs generated before (the demo's eval/t2i/ and eval/qa.jsonl)
  python -m launch.evaluate --metric=shapes --samples=DIR/eval/t2i    # PNGs + prompts.jsonl
  python -m launch.evaluate --metric=qa --answers=DIR/eval/qa.jsonl
  # every metric whose inputs are given
  python -m launch.evaluate --checkpoint=DIR --metric=all [--inception=... --ref_stats=... ...]

Results go to OUT/evaluate_<metric>.json (OUT: --out, else the checkpoint directory, else the folder of
--samples / --answers; an existing file is kept and a new evaluate_<metric>.<n>.json written) and to
OUT/tensorboard_eval/. Evaluation is data parallel over every device of every process.
"""
import os

import numpy as np
from absl import flags

from starflow2_jax import ckpt, entry
from starflow2_jax.demo.generation import DemoGenerator
from starflow2_jax.errors import UserError
from starflow2_jax.eval import frechet, metrics, shapes_generation

METRICS = ("bpd", "nll", "fid", "fd_dinov2", "shapes", "qa", "all")
flags.DEFINE_string("checkpoint", None, "Parameter checkpoint or training workdir (its newest params_*).")
flags.DEFINE_enum("metric", None, METRICS, "What to evaluate.")
flags.DEFINE_integer("num_examples", None, "bpd: held-out examples (default: the whole split).")
flags.DEFINE_integer("num_samples", 0, "fid: samples drawn from --checkpoint.")
flags.DEFINE_string("ref_stats", None, "fid: reference statistics .npz (mu, sigma; pytorch-fid format).")
flags.DEFINE_string("inception", None, "fid: converted FID Inception checkpoint directory.")
flags.DEFINE_string("dinov2", None, "fd_dinov2: converted DINOv2 checkpoint directory.")
flags.DEFINE_string("dinov2_ref_stats", None, "fd_dinov2: reference statistics .npz of DINOv2 features.")
flags.DEFINE_string("samples", None, "fid: a folder of PNGs; shapes: PNGs + prompts.jsonl.")
flags.DEFINE_string("images", None, "fid: a folder of real images whose statistics --save_stats writes.")
flags.DEFINE_string("save_stats", None, "fid: write the statistics of --images to this new .npz.")
flags.DEFINE_string("answers", None, "qa: jsonl of {question, answer, prediction}.")
flags.DEFINE_string("latents", None, "nll: .npy of held-out latents [N, h, w, C].")
flags.DEFINE_integer("num_captions", 64, "shapes (generated): held-out test captions (then every "
                     "single-object caption of an excluded combination).")
flags.DEFINE_integer("num_scenes", 32, "qa (generated): test scenes whose questions are answered.")
flags.DEFINE_integer("batch_size", 64, "Global batch (split over all devices); shapes/qa: requests per "
                     "generation call.")
flags.DEFINE_integer("seed", 0, "Dequantisation / sampling seed.")
flags.DEFINE_string("out", None, "Directory of the results (default: next to the checkpoint or inputs).")
flags.mark_flags_as_required(["metric"])
FLAGS = flags.FLAGS


def _checkpoint(metric: str) -> str:
  if not FLAGS.checkpoint:
    raise UserError(f"--metric={metric} evaluates a model: pass --checkpoint=DIR (a parameter checkpoint "
                    "or a training workdir)")
  return metrics.resolve_checkpoint(FLAGS.checkpoint)


def run_bpd() -> dict:
  if FLAGS.latents:
    raise UserError("--latents is for --metric=nll (latent flows, nats/dim); bits/dim is for pixel flows "
                    "on their held-out images: drop --latents")
  return metrics.bits_per_dim(_checkpoint("bpd"), num=FLAGS.num_examples, batch_size=FLAGS.batch_size,
                              seed=FLAGS.seed)


def run_nll() -> dict:
  if not FLAGS.latents:
    raise UserError("--metric=nll is the latent NLL (nats/dim) of a latent flow: pass --latents=FILE.npy "
                    "(encoded held-out latents [N, h, w, C]); a pixel flow reports bits/dim "
                    "(--metric=bpd)")
  if not os.path.isfile(FLAGS.latents):
    raise FileNotFoundError(f"--latents {FLAGS.latents} not found")
  return metrics.latent_nll(_checkpoint("nll"), np.load(FLAGS.latents), batch_size=FLAGS.batch_size)


def _frechet(metric: str, network: str, network_dir: str | None, ref_stats: str | None) -> dict:
  if FLAGS.save_stats:
    if not FLAGS.images:
      raise UserError("--save_stats writes the statistics of real images: pass --images=DIR")
    feats = metrics.folder_features(network, FLAGS.images, network_dir, batch_size=FLAGS.batch_size)
    return {"stats": frechet.save_statistics(FLAGS.save_stats, *frechet.statistics(feats)),
            "num": len(feats), "images": os.path.abspath(FLAGS.images), "network": network}
  flow = None if FLAGS.samples else _checkpoint(metric)
  return metrics.frechet_metric(network, ref_stats=ref_stats, checkpoint_dir=network_dir,
                                samples=FLAGS.samples, flow=flow, num_samples=FLAGS.num_samples,
                                batch_size=FLAGS.batch_size, seed=FLAGS.seed)


def _model_kind() -> str | None:
  return ckpt.load_config(_checkpoint("all")).get("model_kind", None) if FLAGS.checkpoint else None


_PROXY_INPUTS = {"shapes": ("--samples=DIR (the PNGs and prompts.jsonl)", lambda: FLAGS.samples),
                 "qa": ("--answers=FILE.jsonl ({question, answer, prediction} per line)",
                        lambda: FLAGS.answers)}


def _proxies(which: tuple[str, ...]) -> dict:
  """The ShapesWorld proxies in `which`: of the given outputs (--samples / --answers), else of outputs
  generated by the STARFlow2 --checkpoint (`eval.shapes_generation`), with one loaded generator."""
  generate = tuple(m for m in which if not _PROXY_INPUTS[m][1]())
  results = {}
  if generate:
    if not FLAGS.checkpoint:
      raise UserError(f"--metric={generate[0]} scores generated outputs: pass "
                      f"{_PROXY_INPUTS[generate[0]][0]}, or --checkpoint=DIR of a STARFlow2 model to "
                      "generate them")
    gen = DemoGenerator(_checkpoint(generate[0]), chunk=FLAGS.batch_size, seed=FLAGS.seed)
    results = shapes_generation.generated_proxies(gen, _out_dir(), generate,
                                                  num_captions=FLAGS.num_captions,
                                                  num_scenes=FLAGS.num_scenes)
  if "shapes" in which and FLAGS.samples:
    results["shapes"] = metrics.shapes_prompt_following(FLAGS.samples)
  if "qa" in which and FLAGS.answers:
    results["qa"] = metrics.shapes_qa(FLAGS.answers)
  return results


RUNNERS = {"bpd": run_bpd, "nll": run_nll,
           "fid": lambda: _frechet("fid", "inception", FLAGS.inception, FLAGS.ref_stats),
           "fd_dinov2": lambda: _frechet("fd_dinov2", "dinov2", FLAGS.dinov2, FLAGS.dinov2_ref_stats),
           "shapes": lambda: _proxies(("shapes",))["shapes"],
           "qa": lambda: _proxies(("qa",))["qa"]}


def _all_metrics() -> dict:
  """Every metric whose inputs are given; the others are listed under "skipped" with the reason."""
  kind = _model_kind()
  chosen = {"nll" if FLAGS.latents else "bpd": kind == "flow",
            "fid": bool(FLAGS.ref_stats and FLAGS.inception and (FLAGS.samples or FLAGS.num_samples)),
            "fd_dinov2": bool(FLAGS.dinov2_ref_stats and FLAGS.dinov2 and (FLAGS.samples or
                                                                          FLAGS.num_samples)),
            "shapes": bool(FLAGS.samples and os.path.isfile(os.path.join(FLAGS.samples,
                                                                         metrics.PROMPTS_FILE)))
            or kind == shapes_generation.MODEL_KIND,
            "qa": bool(FLAGS.answers) or kind == shapes_generation.MODEL_KIND}
  needs = {"bpd": "a flow --checkpoint", "nll": "a flow --checkpoint", "fid": "--ref_stats, --inception "
           "and --samples or --num_samples", "fd_dinov2": "--dinov2_ref_stats, --dinov2 and "
           "--samples or --num_samples",
           "shapes": f"--samples with {metrics.PROMPTS_FILE} or a STARFlow2 --checkpoint",
           "qa": "--answers or a STARFlow2 --checkpoint"}
  proxies = tuple(m for m in ("shapes", "qa") if chosen[m])
  results = _proxies(proxies) if proxies else {}
  results.update({name: RUNNERS[name]() for name, ok in chosen.items() if ok and name not in proxies})
  if not results:
    raise UserError("--metric=all found nothing to evaluate: pass --checkpoint, --samples or --answers")
  results["skipped"] = {name: f"needs {needs[name]}" for name, ok in chosen.items() if not ok}
  return results


def _out_dir() -> str:
  if FLAGS.out:
    return FLAGS.out
  if FLAGS.checkpoint:
    return metrics.resolve_checkpoint(FLAGS.checkpoint)
  for path in (FLAGS.samples, FLAGS.images):
    if path:
      return path
  if FLAGS.answers:
    return os.path.dirname(os.path.abspath(FLAGS.answers))
  raise UserError("nothing to evaluate: pass --checkpoint, --samples, --images or --answers")


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}: every option is a --flag")
  out = _out_dir()
  results = _all_metrics() if FLAGS.metric == "all" else RUNNERS[FLAGS.metric]()
  results = {"metric": FLAGS.metric, "checkpoint": FLAGS.checkpoint and os.path.abspath(FLAGS.checkpoint),
             **results}
  path = metrics.write_results(out, f"evaluate_{FLAGS.metric}", results)
  print(results)
  if path:
    print(f"wrote {path}")


if __name__ == "__main__":
  entry.run(main)
