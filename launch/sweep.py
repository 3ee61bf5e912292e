"""Run a scaling study: `python -m launch.sweep --sweep=configs/sweeps/X.py --workdir=DIR [--mode=run]`

  --mode=run      train every point here, one after another (a point already evaluated is skipped, so
                  an interrupted sweep resumes), then collect
  --mode=print    print one `launch.train` command per point (run them on a cluster), nothing else
  --mode=collect  read the points' held-out metrics from DIR/<point>/eval_*.json and fit

Collecting writes DIR/sweep.md (the table and the fit), DIR/sweep.json and DIR/sweep.png (loss
against FLOPs, log-log, with the fitted power law) and prints the fitted exponent. Outputs that
exist are never overwritten (sweep.1.md, ...). The sweep file format: `starflow2_jax.scale.sweep`.
"""
import json
import os
import shlex

from absl import flags, logging

from starflow2_jax import entry
from starflow2_jax.errors import UserError

MODES = ("run", "print", "collect")
_SWEEP = flags.DEFINE_string("sweep", None, "the sweep file (configs/sweeps/*.py)")
_WORKDIR = flags.DEFINE_string("workdir", None, "one sub-directory per point, and the sweep's results")
_MODE = flags.DEFINE_enum("mode", "run", MODES, "run | print | collect")
flags.mark_flags_as_required(["sweep", "workdir"])


def _new_path(workdir: str, stem: str, ext: str) -> str:
  path, n = os.path.join(workdir, f"{stem}.{ext}"), 1
  while os.path.exists(path):
    path, n = os.path.join(workdir, f"{stem}.{n}.{ext}"), n + 1
  return path


def _command(sweep: dict, workdir: str, point) -> str:
  name, _, arg = sweep["base"].partition(":")
  config = f"configs/{name}.py" + (f":{arg}" if arg else "")
  flags_ = " ".join(shlex.quote(f"--config.{k}=" + (v if isinstance(v, str) else
                                                     json.dumps(v, separators=(",", ":"))))
                    for k, v in point.overrides.items())
  return f"python -m launch.train --config={config} --workdir={os.path.join(workdir, point.name)} {flags_}"


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
      print(_command(sweep, workdir, p))
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
  for p in pts:
    sweep_lib.account(configs[p.name], p)
    p.loss = sweep_lib.read_metric(os.path.join(workdir, p.name), sweep["metric"])
  done = [p for p in pts if p.loss is not None]
  missing = [p.name for p in pts if p.loss is None]
  if missing:
    logging.warning("not evaluated yet (left out of the fit): %s", missing)
  best = sweep_lib.frontier(done) if len(sweep_lib.frontier(done)) >= 2 else done
  fit = sweep_lib.fit_power_law(*zip(*[(p.flops, p.loss) for p in best])) if len(best) >= 2 else None
  os.makedirs(workdir, exist_ok=True)
  text = sweep_lib.table(pts, sweep["metric"], fit)
  md = _new_path(workdir, "sweep", "md")
  with open(md, "w") as f:
    f.write(text)
  with open(_new_path(workdir, "sweep", "json"), "w") as f:
    json.dump({"metric": sweep["metric"], "fit": {"a": fit[0], "alpha": fit[1]} if fit else None,
               "points": [p.__dict__ for p in pts]}, f, indent=2)
  png = sweep_lib.plot(_new_path(workdir, "sweep", "png"), done, sweep["metric"], fit) if done else None
  print(text)
  print(f"wrote {md}" + (f" and {png}" if png else ""))
  if fit:
    print(f"fitted exponent: {sweep['metric']} ~ FLOPs^{fit[1]:.4f}")


if __name__ == "__main__":
  entry.run(main)
