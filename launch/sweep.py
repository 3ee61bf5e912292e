"""Run a scaling study: `python -m launch.sweep --sweep=configs/sweeps/X.py --workdir=DIR [--mode=run]`

  --mode=run      train every point here, one after another (a point already evaluated is skipped, so
                  an interrupted sweep resumes), then collect
  --mode=print    print one `launch.train` command per point (run them on a cluster), nothing else
  --mode=collect  read the points' held-out metrics from DIR/<point>/eval_*.json and fit

Collecting writes DIR/sweep.md (the table and the fit), DIR/sweep.json and DIR/sweep.png (loss
against FLOPs, log-log, with the fitted power law) and prints the fitted exponent. Outputs that
exist are never overwritten (sweep.1.md, ...). The sweep file format: `starflow2_jax.scale.sweep`.
`configs/sweeps/tiny_digits.py` is a 3 x 3 grid that runs here in minutes.
"""
import os

from absl import flags, logging

from starflow2_jax import entry
from starflow2_jax.errors import UserError

MODES = ("run", "print", "collect")
_SWEEP = flags.DEFINE_string("sweep", None, "the sweep file (configs/sweeps/*.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "one sub-directory per point, and the sweep's results")
_MODE = flags.DEFINE_enum("mode", "run", MODES, "run | print | collect")
flags.mark_flags_as_required(["sweep", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}: every option is a --flag")
  from starflow2_jax.scale import sweep as sweep_lib
  sweep = sweep_lib.load_sweep(_SWEEP.value)
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  pts = sweep_lib.points(sweep)
  configs = {p.name: sweep_lib.point_config(sweep, p) for p in pts}  # fails early on a bad override
  if _MODE.value == "print":
    for p in pts:
      print(sweep_lib.train_command(sweep, workdir, p))
    return
  if _MODE.value == "run":
    from starflow2_jax.train import loop
    for p in pts:
      point_dir = os.path.join(workdir, p.name)
      if sweep_lib.read_metric(point_dir, sweep["metric"]) is not None:
        logging.info("%s: already evaluated, skipped", p.name)
        continue
      logging.info("training %s (%s)", p.name, p.overrides)
      loop.train_and_evaluate(configs[p.name], point_dir)
  result = sweep_lib.collect(sweep, workdir, configs)
  if result.missing:
    logging.warning("not evaluated yet (left out of the fit): %s", result.missing)
  print(result.text)
  print("wrote " + ", ".join(result.paths))
  if result.fit:
    print(f"fitted exponent: {sweep['metric']} ~ FLOPs^{result.fit[1]:.4f}")


if __name__ == "__main__":
  entry.run(main)
