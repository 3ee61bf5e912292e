"""Scaling studies: a grid of model sizes x compute budgets, held-out loss and FLOPs per point, a
power-law fit of the compute frontier, a Markdown table and a PNG plot.

A sweep file (configs/sweeps/*.py) defines `get_sweep() -> dict`:
  base       "tarflow_digits" (configs/<base>.py) or "tarflow_digits:arg"
  metric     the held-out metric of the task's evaluation to fit (lower is better, positive), e.g. "bpd"
  overrides  {"dotted.field": value}: applied to every point (smaller data, eval size, ...)
  sizes      {size name: {"dotted.field": value}}: the model sizes
  budgets    {budget name: {"dotted.field": value}}: the compute budgets (e.g. train.steps)
Point `<size>-<budget>` = base + overrides + sizes[size] + budgets[budget], trained in its own
WORKDIR/<point>/ by the training loop; its `eval_<step>.json` gives the metric.

FLOPs of a point = train.steps x the analytical FLOPs of one train step (`scale.model_flops`: 6ND +
attention), from abstract shapes only. Fit: on the compute frontier (each point whose loss is below
that of every point with less compute), least squares of log L = log a + alpha log C, i.e.
L = a C^alpha; alpha < 0 when more compute helps.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib.util
import itertools
import json
import math
import os
import shlex
from typing import Any

import jax
import ml_collections
import numpy as np

from starflow2_jax.errors import UserError

REQUIRED = ("base", "metric", "sizes", "budgets")
PLOT_SIZE = (640, 480)  # PNG pixels
PLOT_MARGIN = 60
POINT_RADIUS = 4


@dataclasses.dataclass
class Point:
  name: str
  size: str
  budget: str
  overrides: dict[str, Any]
  params: int = 0
  flops: float = 0.0
  loss: float | None = None  # the held-out metric (None until trained)


def load_sweep(path: str) -> dict:
  """The dict of a sweep file's `get_sweep()` (UserError naming a missing key)."""
  if not os.path.isfile(path):
    raise UserError(f"--sweep={path}: no such file")
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise UserError(f"--sweep={path}: the file defines no get_sweep() -> dict")
  sweep = module.get_sweep()
  missing = [k for k in REQUIRED if k not in sweep]
  if missing:
    raise UserError(f"--sweep={path}: get_sweep() lacks {missing}; expected keys {REQUIRED} (+ overrides)")
  if not sweep["sizes"] or not sweep["budgets"]:
    raise UserError(f"--sweep={path}: sizes and budgets must each name at least one entry")
  return sweep


def base_config(sweep: dict) -> ml_collections.ConfigDict:
  import importlib
  name, _, arg = sweep["base"].partition(":")
  try:
    module = importlib.import_module(f"configs.{name}")
  except ModuleNotFoundError as e:
    raise UserError(f"sweep base={sweep['base']!r}: no configs/{name}.py") from e
  return module.get_config(arg or None)


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of config with {"dotted.field": value} set; an unknown field fails naming it."""
  import copy
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for p in path:
      if p not in node:
        raise UserError(f"sweep override {key!r}: the config has no field {p!r}")
      node = node[p]
    if last not in node:
      raise UserError(f"sweep override {key!r}: the config has no field {last!r}")
    node[last] = value
  return config


def points(sweep: dict) -> list[Point]:
  common = dict(sweep.get("overrides", {}))
  return [Point(f"{s}-{b}", s, b, {**common, **sweep["sizes"][s], **sweep["budgets"][b]})
          for s, b in itertools.product(sweep["sizes"], sweep["budgets"])]


def train_command(sweep: dict, workdir: str, point: Point) -> str:
  """The `launch.train` command line of one point (for a cluster; --mode=collect reads the result)."""
  name, _, arg = sweep["base"].partition(":")
  config = f"configs/{name}.py" + (f":{arg}" if arg else "")
  overrides = " ".join(shlex.quote(f"--config.{k}=" + (v if isinstance(v, str) else
                                                       json.dumps(v, separators=(",", ":"))))
                       for k, v in point.overrides.items())
  return (f"python -m launch.train --config={config} "
          f"--workdir={shlex.quote(os.path.join(workdir, point.name))} {overrides}")


def point_config(sweep: dict, point: Point) -> ml_collections.ConfigDict:
  return apply_overrides(base_config(sweep), point.overrides)


def account(config: ml_collections.ConfigDict, point: Point, cache: dict | None = None) -> None:
  """Fill point.params and point.flops (train.steps x analytical step FLOPs), from abstract shapes.
  cache: {config without train.steps: (params, step FLOPs)}, shared by the points of one size."""
  from starflow2_jax.scale import abstract, model_flops
  # one device: the FLOPs of a step do not depend on the mesh, nor (per step) on train.steps
  config = apply_overrides(config, {"mesh.shape": {"data": 1, "fsdp": 1, "tensor": 1}})
  key = apply_overrides(config, {"train.steps": 1}).to_json_best_effort(sort_keys=True)
  if cache is None or key not in cache:
    plan = abstract.build(config, jax.devices()[:1])
    step = model_flops.train_step_flops(plan.config, plan.state.params, plan.trainable, plan.frozen,
                                        plan.task.tokens_per_example)
    value = (sum(x.size for x in jax.tree.leaves(plan.state.params)), step.total)
    if cache is None:
      cache = {}
    cache[key] = value
  point.params, step_flops = cache[key]
  point.flops = step_flops * int(config.train.steps)


def read_metric(workdir: str, metric: str) -> float | None:
  """The metric of the newest eval_<step>.json in workdir (None: not trained yet)."""
  files = sorted(glob.glob(os.path.join(workdir, "eval_*.json")))
  if not files:
    return None
  with open(files[-1]) as f:
    summary = json.load(f)
  evals = summary.get("eval", {})
  if metric not in evals:
    raise UserError(f"sweep metric={metric!r}: {files[-1]} holds the held-out metrics {sorted(evals)}")
  return float(evals[metric])


def frontier(pts: list[Point]) -> list[Point]:
  """Points whose loss is below that of every point with less compute, by compute."""
  out, best = [], math.inf
  for p in sorted(pts, key=lambda p: p.flops):
    if p.loss < best:
      out.append(p)
      best = p.loss
  return out


def fit_power_law(flops: list[float], losses: list[float]) -> tuple[float, float]:
  """(a, alpha) of L = a C^alpha, least squares in log-log."""
  if len(flops) < 2:
    raise UserError(f"a power-law fit needs points of at least 2 compute budgets, found {len(flops)}")
  if min(losses) <= 0:
    raise UserError(f"a power-law fit needs positive losses, found {min(losses)}; pick a positive metric")
  alpha, log_a = np.polyfit(np.log(flops), np.log(losses), 1)
  return float(math.exp(log_a)), float(alpha)


def table(pts: list[Point], metric: str, fit: tuple[float, float] | None) -> str:
  lines = [f"| point | size | budget | parameters | FLOPs | held-out {metric} |", "|---|---|---|---|---|---|"]
  for p in pts:
    loss = f"{p.loss:.4f}" if p.loss is not None else "-"
    lines.append(f"| {p.name} | {p.size} | {p.budget} | {p.params:,} | {p.flops:.3e} | {loss} |")
  if fit:
    lines.append(f"\nfit on the compute frontier: {metric} = {fit[0]:.4g} x FLOPs^{fit[1]:.4f}")
  return "\n".join(lines) + "\n"


def plot(path: str, pts: list[Point], metric: str, fit: tuple[float, float] | None) -> str:
  """Loss against FLOPs, log-log, one colour per size, the fitted line: a PNG (PIL, no matplotlib)."""
  from PIL import Image, ImageDraw
  w, h = PLOT_SIZE
  m = PLOT_MARGIN
  img = Image.new("RGB", PLOT_SIZE, "white")
  d = ImageDraw.Draw(img)
  xs = np.log10([p.flops for p in pts])
  ys = np.log10([p.loss for p in pts])
  x0, x1 = xs.min() - 0.1, xs.max() + 0.1
  y0, y1 = ys.min() - 0.05, ys.max() + 0.05

  def to_px(x, y):
    return m + (x - x0) / (x1 - x0) * (w - 2 * m), h - m - (y - y0) / (y1 - y0) * (h - 2 * m)

  d.rectangle([m, m, w - m, h - m], outline="black")
  for x in np.linspace(x0, x1, 5):
    px, _ = to_px(x, y0)
    d.text((px - 20, h - m + 8), f"1e{x:.1f}", fill="black")
  for y in np.linspace(y0, y1, 5):
    _, py = to_px(x0, y)
    d.text((4, py - 6), f"{10 ** y:.3g}", fill="black")
  d.text((w // 2 - 60, h - 24), "training FLOPs (log)", fill="black")
  d.text((m, 16), f"held-out {metric} (log) vs compute", fill="black")
  palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
  sizes = list(dict.fromkeys(p.size for p in pts))
  for i, s in enumerate(sizes):
    colour = palette[i % len(palette)]
    mine = sorted((p for p in pts if p.size == s), key=lambda p: p.flops)
    line = [to_px(math.log10(p.flops), math.log10(p.loss)) for p in mine]
    if len(line) > 1:
      d.line(line, fill=colour, width=1)
    for px, py in line:
      d.ellipse([px - POINT_RADIUS, py - POINT_RADIUS, px + POINT_RADIUS, py + POINT_RADIUS], fill=colour)
    d.text((w - m + 4, m + 14 * i), s, fill=colour)
  if fit:
    a, alpha = fit
    ends = [to_px(x, math.log10(a) + alpha * x) for x in (x0, x1)]
    d.line(ends, fill="black", width=2)
    d.text((m + 8, m + 8), f"{metric} = {a:.3g} C^{alpha:.3f}", fill="black")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img.save(path)
  return path


@dataclasses.dataclass
class Result:
  points: list[Point]
  fit: tuple[float, float] | None  # (a, alpha)
  missing: list[str]  # points not evaluated yet
  text: str  # the Markdown table and fit
  paths: list[str]  # files written


def _new_path(workdir: str, stem: str, ext: str) -> str:
  path, n = os.path.join(workdir, f"{stem}.{ext}"), 1
  while os.path.exists(path):
    path, n = os.path.join(workdir, f"{stem}.{n}.{ext}"), n + 1
  return path


def collect(sweep: dict, workdir: str, configs: dict[str, ml_collections.ConfigDict]) -> Result:
  """Read every point's metric in workdir, count its FLOPs, fit the frontier, and write sweep.md,
  sweep.json and sweep.png (new names when they exist). configs: {point name: its config}."""
  pts = points(sweep)
  cache: dict = {}
  for p in pts:
    account(configs[p.name], p, cache)
    p.loss = read_metric(os.path.join(workdir, p.name), sweep["metric"])
  done = [p for p in pts if p.loss is not None]
  best = frontier(done) if len(frontier(done)) >= 2 else done
  fit = fit_power_law([p.flops for p in best], [p.loss for p in best]) if len(best) >= 2 else None
  text = table(pts, sweep["metric"], fit)
  os.makedirs(workdir, exist_ok=True)
  paths = [_new_path(workdir, "sweep", "md"), _new_path(workdir, "sweep", "json")]
  with open(paths[0], "w") as f:
    f.write(text)
  with open(paths[1], "w") as f:
    json.dump({"metric": sweep["metric"], "fit": {"a": fit[0], "alpha": fit[1]} if fit else None,
               "points": [dataclasses.asdict(p) for p in pts]}, f, indent=2)
  if done:
    paths.append(plot(_new_path(workdir, "sweep", "png"), done, sweep["metric"], fit))
  return Result(pts, fit, [p.name for p in pts if p.loss is None], text, paths)
