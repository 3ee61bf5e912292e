"""The task registry: `config.model_kind` -> the builder of its `Task` ("module:function", imported
on demand with importlib, so this module imports no task and no model package: no import cycle).

A builder is `build(config, mesh, rules) -> Task`. A new model is a new task file plus one line here.
"""
from __future__ import annotations

import importlib

import jax
import ml_collections

from starflow2_jax.errors import UserError
from starflow2_jax.train.task import Task

TASKS = {
    "flow": "starflow2_jax.train.flow_task:build",
    "fae": "starflow2_jax.train.fae_task:build",
    "starflow2": "starflow2_jax.train.pretzel_task:build",
    "lm": "starflow2_jax.train.lm_task:build",
}


def build_task(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules) -> Task:
  """The task for `config.model_kind`."""
  kind = config.get("model_kind", None)
  if kind not in TASKS:
    raise UserError(f"config.model_kind={kind!r}: expected one of {sorted(TASKS)}")
  module, builder = TASKS[kind].split(":")
  return getattr(importlib.import_module(module), builder)(config, mesh, rules)
