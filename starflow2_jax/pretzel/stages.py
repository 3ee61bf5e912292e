"""Training stages as parameter groups and loss weights (STARFLOW2.md 5.4).

Groups of the trainable tree (`param_labels`, the task's `Task.param_labels`): shallow (every shallow
block with its SOS), deep (the deep block with proj_in, proj_out, its final norm and P_txt), adapter,
w_vlm, w_d, taps. The VLM and the FAE are not in the trainable tree at all (the frozen argument).

  stage 1  generation pretraining   shallow, deep          L_NF          model mode "nf"
  stage 2  understanding alignment  adapter                L_NTP         model mode "ntp"
  stage 3  joint                    all six groups         L_NF + lambda L_NTP   model mode "full"

A stage is selected by `config.stage`; `config.train.trainable` must name a non-empty subset of the
stage's groups (`apply_stage` sets it to all of them; the optimizer freezes the rest with
`optax.set_to_zero`). Each stage warm-starts from the previous one through `config.init_from`
(`train.warm_start`): the parameter tree is the same in every stage, so every parameter is taken, and
groups a stage never trained (adapter, w_vlm, w_d, taps before stage 3) keep their zero output init.
"""
from __future__ import annotations

import dataclasses

import jax
import ml_collections

from starflow2_jax.errors import UserError

GROUPS = ("shallow", "deep", "adapter", "w_vlm", "w_d", "taps")
SHALLOW_PREFIX = "shallow_"


@dataclasses.dataclass(frozen=True)
class Stage:
  """groups: what trains; nf / ntp: whether the loss has L_NF / L_NTP; mode: the model's mode."""
  groups: tuple[str, ...]
  nf: bool
  ntp: bool
  mode: str


STAGES = {
    1: Stage(("shallow", "deep"), nf=True, ntp=False, mode="nf"),
    2: Stage(("adapter",), nf=False, ntp=True, mode="ntp"),
    3: Stage(GROUPS, nf=True, ntp=True, mode="full"),
}


def group_of(top_level_name: str) -> str:
  """The group of a top-level parameter module name (shallow_<k> -> shallow)."""
  if top_level_name.startswith(SHALLOW_PREFIX):
    return "shallow"
  if top_level_name not in GROUPS:
    raise ValueError(f"parameter module {top_level_name!r} belongs to no group of {GROUPS}")
  return top_level_name


def param_labels(params) -> dict:
  """A tree like the (unboxed) trainable params with each leaf's group name."""
  return {name: jax.tree.map(lambda _, g=group_of(name): g, sub) for name, sub in params.items()}


def stage(number) -> Stage:
  if number not in STAGES:
    raise UserError(f"config.stage: expected one of {sorted(STAGES)}, found {number!r}; pick the "
                    "training stage (configs take it as get_config('stage=N'))")
  return STAGES[number]


def stage_groups(number: int, present) -> tuple[str, ...]:
  """The groups stage `number` trains among the `present` ones (taps exist only with skip_taps)."""
  return tuple(g for g in stage(number).groups if g in set(present))


def objective(number: int, lambda_ntp: float) -> dict[str, float]:
  """{loss term: weight} of the stage (the train step's objective)."""
  s = stage(number)
  weights = {}
  if s.nf:
    weights["nf"] = 1.0
  if s.ntp:
    weights["ntp"] = float(lambda_ntp) if s.nf else 1.0
  return weights


def stage_from_arg(arg: str | None, default: int = 1) -> int:
  """A config file's argument 'stage=N' (None: `default`) -> N."""
  if not arg:
    return default
  key, _, value = arg.partition("=")
  if key != "stage" or not value.isdigit() or int(value) not in STAGES:
    raise UserError(f"config argument {arg!r}: expected 'stage=N' with N in {sorted(STAGES)}, e.g. "
                    "--config=configs/starflow2_tiny.py:stage=2")
  return int(value)


def apply_stage(config: ml_collections.ConfigDict, number: int) -> ml_collections.ConfigDict:
  """Set config.stage and config.train.trainable to the stage's groups (taps only with skip_taps)."""
  present = [g for g in GROUPS if g != "taps" or list(config.model.get("skip_taps", []))]
  config.stage = int(number)
  config.train.trainable = list(stage_groups(int(number), present))
  return config


def check_trainable(config: ml_collections.ConfigDict, present) -> tuple[str, ...]:
  """config.train.trainable must be a non-empty subset of the stage's groups; returns it."""
  number = config.get("stage", None)
  allowed = stage_groups(number, present)
  asked = tuple(config.train.get("trainable", ()) or ())
  if not asked or not allowed:
    raise UserError(f"stage {number} has no trainable group: train.trainable={list(asked)}, and the "
                    f"stage trains {list(allowed)} of this model's groups {list(present)}; set "
                    f"train.trainable={list(allowed) or list(stage(number).groups)} (get_config"
                    f"('stage={number}') does it), or add the groups the stage needs to the model")
  outside = sorted(set(asked) - set(allowed))
  if outside:
    raise UserError(f"train.trainable={list(asked)}: stage {number} trains only {list(allowed)}, not "
                    f"{outside}; remove them, or choose the stage that trains them (config.stage)")
  return asked
