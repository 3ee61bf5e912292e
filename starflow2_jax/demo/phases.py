"""The demo's phases, in order, and the record of what has run (STARFlow2 end to end on ShapesWorld).

  DIR/tokenizer/tokenizer.json   phase tokenizer: the toy byte-level BPE (pretzel.toy_tokenizer)
  DIR/lm/                        phase lm:     launch.train configs/lm_shapesworld.py
  DIR/fae/                       phase fae:    launch.train configs/fae_shapesworld.py
  DIR/stage1/, stage2/, stage3/  phases stage1-3: launch.train configs/starflow2_shapesworld.py:stage=N,
                                 each warm-started from the previous stage (config.init_from)
  DIR/eval/                      phase eval:   demo.evaluate (generation, detector, QA, document)
  DIR/demo.json                  the demo's size and, per phase, its wall time (summed over runs) and
                                 whether it finished
Every training phase is an ordinary `launch.train` run: the demo prints its command line, builds the
same config (the config file with the same overrides) and calls the same loop, so a phase can be run,
resumed or replaced by hand. A finished phase is skipped; an interrupted one resumes from its own
checkpoint (the loop's rule).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shlex
import time
from typing import Any, Callable

import ml_collections

from starflow2_jax.errors import UserError
from starflow2_jax.train import warm_start

STATE_FILE = "demo.json"
SIZES = ("full", "smoke")
TOKENIZER_FILE = "tokenizer.json"
STAGES = (1, 2, 3)
# The FAE's demo-size overrides (configs/fae_shapesworld.py is shared with other uses).
FAE_FULL = {"train.steps": 600, "fae.stats_images": 4000}
FAE_SMOKE = {"train.steps": 3, "train.warmup": 1, "train.batch_size": 8, "log.every": 1,
             "log.sample_every": 0, "log.num_samples": 0, "log.eval_examples": 8,
             "fae.stats_images": 16, "data.shapes_num_test": 16}


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each phase writes, under the demo's workdir `root`."""
  root: str

  def dir(self, phase: str) -> str:
    return os.path.join(self.root, phase)

  @property
  def tokenizer(self) -> str:
    return os.path.join(self.root, "tokenizer", TOKENIZER_FILE)

  def export(self, phase: str) -> str:
    """The exported parameter checkpoint of a finished training phase (its newest params_<step>/)."""
    kind, path = warm_start.resolve(self.dir(phase))
    if kind != "params":
      raise UserError(f"{self.dir(phase)} has no exported parameters (params_<step>/): its phase did not "
                      "finish; run the demo again to resume it")
    return path


@dataclasses.dataclass(frozen=True)
class TrainPhase:
  """A `launch.train` run: `config` file (relative to the repository) with argument `arg`, and the
  overrides (dotted field -> value) that `overrides()` gives once the earlier phases have finished."""
  name: str
  config: str
  arg: str | None
  overrides: Callable[[], dict[str, Any]]

  def base(self) -> ml_collections.ConfigDict:
    """The config file's config, before the overrides."""
    module = importlib.import_module(self.config[:-len(".py")].replace("/", "."))
    return module.get_config(self.arg)

  def build(self) -> ml_collections.ConfigDict:
    config = self.base()
    for key, value in self.overrides().items():
      set_field(config, key, value)
    return config

  def command(self, workdir: str) -> str:
    spec = self.config + (f":{self.arg}" if self.arg else "")
    parts = ["python", "-m", "launch.train", f"--config={spec}", f"--workdir={workdir}"]
    parts += [f"--config.{k}={_flag_value(v)}" for k, v in self.overrides().items()]
    return " ".join(shlex.quote(p) for p in parts)


def _flag_value(value: Any) -> str:
  return json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)


def set_field(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """config.<key> = value for a dotted key naming an existing field (else a UserError naming it)."""
  node, path = config, key.split(".")
  for depth, part in enumerate(path):
    if part not in node:
      raise UserError(f"demo override {key}: the config has no field {'.'.join(path[:depth + 1])}")
    if depth + 1 < len(path):
      node = node[part]
  node[path[-1]] = value


def train_phases(layout: Layout, smoke: bool) -> list[TrainPhase]:
  """lm, fae, stage1, stage2, stage3 (module docstring)."""
  size = "smoke" if smoke else None
  tok = {"tokenizer": layout.tokenizer}

  def stage_overrides(n: int) -> Callable[[], dict]:
    def overrides():
      o = {**tok, "vlm.checkpoint": layout.export("lm"), "fae.checkpoint": layout.export("fae")}
      if n > 1:
        o["init_from"] = layout.dir(f"stage{n - 1}")
      return o
    return overrides

  stages = [TrainPhase(f"stage{n}", "configs/starflow2_shapesworld.py",
                       f"stage={n}" + (",smoke" if smoke else ""), stage_overrides(n)) for n in STAGES]
  world = {"data.shapes_layout": shapes_layout(stages)}  # the FAE learns the scenes the flow sees
  return [TrainPhase("lm", "configs/lm_shapesworld.py", size, lambda: dict(tok)),
          TrainPhase("fae", "configs/fae_shapesworld.py", None,
                     lambda: {**(FAE_SMOKE if smoke else FAE_FULL), **world}),
          *stages]


def shapes_layout(phases: list[TrainPhase]) -> str:
  """The ShapesWorld layout of the STARFlow2 stages (data.shapes_layout), which the tokenizer's and the
  FAE's training text and images follow."""
  return next(p for p in phases if p.name.startswith("stage")).base().data.shapes_layout


PHASES = ("tokenizer", "lm", "fae", "stage1", "stage2", "stage3", "eval")


class State:
  """DIR/demo.json: {"size": "full" | "smoke", "phases": {name: {"seconds": float, "done": bool}}}.
  A demo directory keeps the size it was started with."""

  def __init__(self, root: str, size: str):
    if size not in SIZES:
      raise UserError(f"demo size {size!r}: expected one of {SIZES}")
    self.path = os.path.join(root, STATE_FILE)
    if os.path.exists(self.path):
      with open(self.path) as f:
        self.data = json.load(f)
      if self.data.get("size") != size:
        raise UserError(f"{root} holds a demo of size {self.data.get('size')!r}, not {size!r}: run with "
                        f"{'--smoke' if self.data.get('size') == 'smoke' else 'no --smoke'} to resume it, "
                        "or choose a new --workdir")
    else:
      os.makedirs(root, exist_ok=True)
      self.data = {"size": size, "phases": {}}
      self._write()

  def _write(self) -> None:
    tmp = f"{self.path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump(self.data, f, indent=2)
    os.replace(tmp, self.path)

  def done(self, phase: str) -> bool:
    return bool(self.data["phases"].get(phase, {}).get("done", False))

  def seconds(self, phase: str) -> float:
    return float(self.data["phases"].get(phase, {}).get("seconds", 0.0))

  def run(self, phase: str, fn: Callable[[], Any]) -> Any:
    """Run fn, adding its wall time to the phase (also when it fails); mark the phase done."""
    start = time.time()
    try:
      out = fn()
    finally:
      entry = self.data["phases"].setdefault(phase, {"seconds": 0.0, "done": False})
      entry["seconds"] = entry["seconds"] + time.time() - start
      self._write()
    self.data["phases"][phase]["done"] = True
    self._write()
    return out


def latest_eval(workdir: str, required: bool = True) -> dict:
  """The held-out metrics of a finished training phase: its newest eval_<step>[.n].json's "eval" ({}
  when it has none and they are not `required`: a run with log.eval_examples=0)."""
  found = sorted((f for f in os.listdir(workdir) if f.startswith("eval_") and f.endswith(".json")),
                 key=lambda f: os.path.getmtime(os.path.join(workdir, f)))
  if not found and not required:
    return {}
  if not found:
    raise UserError(f"{workdir} has no eval_<step>.json: its phase did not finish its evaluation; run "
                    "the demo again to resume it")
  with open(os.path.join(workdir, found[-1])) as f:
    return json.load(f).get("eval", {})
