"""A config's train step on any devices, from abstract values only (nothing is allocated).

  plan = build(config, devices)                # devices: a TPU topology's or this host's
  plan.lower()                                 # -> jax.stages.Lowered of the real train step

The step is the loop's own (`train.step.make_train_step` over `train.tasks.build_task(config, ...)`,
`optimizer.for_task`, `state.state_shardings`), lowered with ShapeDtypeStructs that carry the
shardings of the config's mesh: the trainable parameters, the optimizer state (and EMA), the task's
frozen subtree (a pretrained VLM / FAE) and one global batch. Any registered task compiles; the batch's
fields are the task's `record_transform` of a synthetic record (zeros of the data config's image shape,
label 0, a text-to-image record with empty texts). A task whose builder draws frozen weights must give
them as ShapeDtypeStructs when `parallel.compile_only(mesh)` (the STARFlow2 task's random stand-ins).

Platform. On a CPU host compiling for TPU, JAX's default backend is the CPU: the step is traced
inside `nn.attention_ops.target_platform` of the mesh's devices, so every "auto" attention kernel (of
every stream, its config naming one or not) is the target's (TPU: "xla"), not the host's. Configs made
for import and sampling only (no `train` section, e.g. tarflow_afhq256) get the training defaults of
`train.defaults.base_config`, with the data image shape read from `config.model`.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from starflow2_jax import parallel
from starflow2_jax.errors import UserError
from starflow2_jax.nn import attention_ops
from starflow2_jax.train import defaults, optimizer, state as state_lib, step as step_lib, tasks
from starflow2_jax.train.task import Task

SYNTHETIC_TEXT = ""  # captions, questions and answers of the synthetic record
SYNTHETIC_KIND = "text_to_image"  # the synthetic record's example kind (Pretzel sequences)
RGB = 3  # channels of a synthetic image when the data config names none


def with_train_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` completed with the training defaults it lacks."""
  config = copy.deepcopy(config)
  with config.unlocked():
    base = defaults.base_config()
    had_data = "data" in config
    for key in base.keys():
      if key not in config:
        config[key] = base[key]
    if not had_data and "model" in config:
      for field in ("image_size", "channels"):
        if field in config.model:
          config.data[field] = config.model[field]
  return config


def _synthetic_record(data: ml_collections.ConfigDict) -> dict:
  size, channels = int(data.image_size), int(data.get("channels", RGB))
  return {"image": np.zeros((size, size, channels), np.uint8), "label": np.int32(0),
          "kind": SYNTHETIC_KIND, "caption": SYNTHETIC_TEXT, "questions": [SYNTHETIC_TEXT],
          "answers": [SYNTHETIC_TEXT]}


def example_spec(config: ml_collections.ConfigDict, task: Task) -> dict[str, jax.ShapeDtypeStruct]:
  """{field: shape and dtype of one example} of the task's batches."""
  try:
    example = task.record_transform(_synthetic_record(config.data))
  except Exception as e:  # a task whose transform needs real records names itself here
    raise UserError(f"model_kind={config.model_kind!r}: its record_transform does not take a synthetic "
                    f"record (zeros of data.image_size={config.data.image_size}, "
                    "a text-to-image record with empty texts): {type(e).__name__}: {e}") from e
  return {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in example.items()}


def with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs with `shardings` for a tree of arrays or ShapeDtypeStructs (None: no tree)."""
  if tree is None:
    return None
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@dataclasses.dataclass
class Plan:
  """Everything the compiled train step needs, abstract and sharded on `mesh`."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  rules: Any
  task: Task
  tx: Any  # the optimizer (optimizer.for_task)
  init_rng: jax.Array  # the key the loop initialises the parameters with
  trainable: Any  # bools like the params: which parameters train
  train_step: Any  # train.step.make_train_step's function (with .lower)
  state: state_lib.TrainState  # ShapeDtypeStructs with shardings
  frozen: Any
  batch: dict[str, jax.ShapeDtypeStruct]
  rng: jax.ShapeDtypeStruct

  @property
  def args(self) -> tuple:
    return (self.state, self.frozen, self.batch, self.rng)

  def lower(self) -> jax.stages.Lowered:
    with attention_ops.target_platform(self.mesh.devices.flat[0].platform):
      return self.train_step.lower(*self.args)


def build(config: ml_collections.ConfigDict, devices: list) -> Plan:
  """The abstract train step of `config` on a mesh over `devices` (config.mesh decides its shape)."""
  from starflow2_jax.train import loop  # the loop's own validation of the train section
  config = with_train_defaults(config)
  loop.validate(config)
  tc = config.train
  mesh = parallel.make_mesh(config.mesh, devices)
  rules = parallel.logical_rules(config)
  parallel.check_global_batch(int(tc.batch_size), mesh, int(tc.grad_accum))
  task = tasks.build_task(config, mesh, rules)
  init_rng = jax.random.fold_in(jax.random.key(int(tc.seed)), 0)
  tx, _, trainable = optimizer.for_task(tc, task, init_rng)
  state_sh = state_lib.state_shardings(task.init_fn, tx, init_rng, mesh, rules,
                                       float(tc.ema_decay) > 0)
  state = state_lib.abstract_state(task.init_fn, tx, init_rng, state_sh)
  frozen = with_shardings(task.frozen, task.frozen_shardings)
  batch = {k: jax.ShapeDtypeStruct((int(tc.batch_size),) + s.shape, s.dtype,
                                   sharding=parallel.batch_sharding(mesh, 1 + len(s.shape)))
           for k, s in example_spec(config, task).items()}
  rng = jax.ShapeDtypeStruct(init_rng.shape, init_rng.dtype, sharding=parallel.replicated(mesh))
  train_step = step_lib.make_train_step(
      task.loss_fn, tx, optimizer.learning_rate_schedule(tc), tc, mesh, rules, state_sh,
      task.frozen_shardings, objective=task.objective, trainable=trainable)
  return Plan(config, mesh, rules, task, tx, init_rng, trainable, train_step, state, frozen, batch, rng)
