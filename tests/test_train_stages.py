"""Training stages: parameter groups, frozen groups (no update, no gradient, no optimizer state, no
weight decay), per-group learning rates, unknown groups, and warm starts from another run (taken, new,
mismatched; only on a fresh start)."""
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from starflow2_jax import ckpt, parallel
from starflow2_jax.errors import UserError
from starflow2_jax.train import loop, optimizer, state as state_lib, step as step_lib, tasks, warm_start
from test_train_step import _batch, _perturbed
from train_runner import tiny_config

DECAY = 0.5  # a weight decay large enough to move any parameter it touches


def _labels(cfg):
  """The tiny flow's parameter groups, from abstract shapes (nothing compiled)."""
  mesh = parallel.make_mesh({"shape": {"data": 1}}, jax.devices()[:1])
  task = tasks.build_task(cfg, mesh, parallel.logical_rules(cfg))
  return task.param_labels(nn.unbox(jax.eval_shape(task.init_fn, jax.random.key(0))))


def _setup(cfg, devices=1):
  mesh = parallel.make_mesh({"shape": {"data": devices}}, jax.devices()[:devices])
  rules = parallel.logical_rules(cfg)
  task = tasks.build_task(cfg, mesh, rules)
  init = _perturbed(task.init_fn)
  labels = task.param_labels(nn.unbox(jax.eval_shape(init, jax.random.key(0))))
  tx = optimizer.make_optimizer(cfg.train, labels)
  state, sh = state_lib.init_sharded(init, tx, jax.random.key(0), mesh, rules, False)
  return mesh, rules, task, labels, tx, state, sh


def _steps(cfg, n=3):
  """n steps of the tiny flow under cfg's stage settings: (params before, params after, last grads,
  the opt_state, the labels), numpy."""
  mesh, rules, task, labels, tx, state, sh = _setup(cfg)
  before = jax.tree.map(np.asarray, state.params)
  step = step_lib.make_train_step(task.loss_fn, tx, optimizer.learning_rate_schedule(cfg.train),
                                  cfg.train, mesh, rules, sh, None, objective=task.objective,
                                  trainable=optimizer.trainable_mask(labels, cfg.train),
                                  return_grads=True)
  for i in range(n):
    gb = parallel.make_global_batch(_batch(cfg, cfg.train.batch_size, i * cfg.train.batch_size), mesh,
                                    cfg.train.batch_size)
    state, _, grads = step(state, None, gb, jax.random.key(7))
  return before, jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, grads), \
      state.opt_state, labels


_RUNS = {}  # (n, overrides) -> _steps: tests that need the same run share it (one set of compiles)


def _steps_of(n, **overrides):
  key = (n, repr(sorted(overrides.items())))
  if key not in _RUNS:
    _RUNS[key] = _steps(tiny_config(**overrides), n)
  return _RUNS[key]


def _paths(tree):
  return [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_flow_groups_are_the_blocks():
  labels = _labels(tiny_config())
  assert sorted(set(jax.tree.leaves(labels))) == ["blocks_0", "blocks_1"]
  for path, group in zip(_paths(labels), jax.tree.leaves(labels)):
    assert path.startswith(f"['{group}']")


def test_frozen_group_is_bit_identical_without_gradient_state_or_decay():
  before, after, grads, opt_state, _ = _steps_of(3, **{"train.trainable": ["blocks_1"],
                                                       "train.weight_decay": DECAY})
  for name in ("blocks_0", "blocks_1"):
    frozen = name == "blocks_0"
    for (path, a), b, g in zip(jax.tree_util.tree_flatten_with_path(before[name])[0],
                               jax.tree.leaves(after[name]), jax.tree.leaves(grads[name])):
      assert np.array_equal(a, b) == frozen, (name, jax.tree_util.keystr(path))
      assert (not np.any(g)) == frozen, (name, jax.tree_util.keystr(path))
  state_paths = [p for p, x in zip(_paths(opt_state), jax.tree.leaves(opt_state)) if x.ndim]
  assert state_paths and all("blocks_1" in p for p in state_paths), state_paths  # no blocks_0 moments
  # without the stage mask the same settings move blocks_0 (so the test above can fail)
  before, after, _, _, _ = _steps_of(1, **{"train.weight_decay": DECAY})
  assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["blocks_0"]),
                                                        jax.tree.leaves(after["blocks_0"])))


def test_group_learning_rate_multiplier_scales_the_update():
  """AdamW's first update (about lr per parameter, plus lr x decay x parameter: both scale with lr),
  against the decayed run of the test above."""
  before, p1, _, _, _ = _steps_of(1, **{"train.weight_decay": DECAY})
  _, p2, _, _, _ = _steps_of(1, **{"train.weight_decay": DECAY, "train.group_lr": {"blocks_1": 2.0}})
  for a, b, c in zip(jax.tree.leaves(before["blocks_1"]), jax.tree.leaves(p1["blocks_1"]),
                     jax.tree.leaves(p2["blocks_1"])):
    np.testing.assert_allclose(c - a, 2.0 * (b - a), rtol=1e-3, atol=1e-6)
  for b, c in zip(jax.tree.leaves(p1["blocks_0"]), jax.tree.leaves(p2["blocks_0"])):
    np.testing.assert_array_equal(b, c)


@pytest.mark.parametrize("field,value,match", [
    ("trainable", ["blocks_9"], r"unknown parameter groups \['blocks_9'\].*\['blocks_0', 'blocks_1'\]"),
    ("group_lr", {"block_1": 2.0}, r"unknown parameter groups \['block_1'\].*\['blocks_0', 'blocks_1'\]"),
])
def test_unknown_groups_are_user_errors_listing_the_groups(field, value, match, tmp_path):
  cfg = tiny_config(**{f"train.{field}": value})
  with pytest.raises(UserError, match=match):
    loop.train_and_evaluate(cfg, str(tmp_path))
  assert not os.listdir(tmp_path)  # failed before writing anything


def test_group_lr_of_a_frozen_group_is_an_error():
  cfg = tiny_config(**{"train.trainable": ["blocks_0"], "train.group_lr": {"blocks_1": 0.1}})
  with pytest.raises(UserError, match=r"sets \['blocks_1'\], which train.trainable"):
    optimizer.make_optimizer(cfg.train, _labels(tiny_config()))


def _abstract_setup(cfg):
  """(tx, the abstract TrainState, its shardings) of the tiny flow: shapes only, nothing compiled."""
  mesh = parallel.make_mesh({"shape": {"data": 1}}, jax.devices()[:1])
  rules = parallel.logical_rules(cfg)
  init = _perturbed(tasks.build_task(cfg, mesh, rules).init_fn)
  tx = optimizer.make_optimizer(cfg.train, _labels(cfg))
  sh = state_lib.state_shardings(init, tx, jax.random.key(0), mesh, rules, False)
  return tx, state_lib.abstract_state(init, tx, jax.random.key(0), sh), sh


def test_warm_start_takes_same_shapes_and_initialises_new_parameters(tmp_path):
  src_cfg = tiny_config()
  _, abstract, _ = _abstract_setup(src_cfg)
  rng = np.random.default_rng(0)  # stored parameters distinct from any init
  src = jax.tree.map(lambda x: (1.0 + rng.normal(size=x.shape)).astype(x.dtype), abstract.params)
  ckpt.save_params(str(tmp_path / "stage1"), {"params": src}, src_cfg)
  cfg = tiny_config(**{"model.layers_per_block": [1, 1, 1]})  # stage 2 adds a block
  _, _, _, _, tx, state, sh = _setup(cfg)
  fresh = jax.tree.map(np.asarray, state.params)
  warm, report = warm_start.apply(state, sh, tx, str(tmp_path / "stage1"))
  for name in ("blocks_0", "blocks_1"):
    for a, b in zip(jax.tree.leaves(warm.params[name]), jax.tree.leaves(src[name])):
      assert np.array_equal(np.asarray(a), b)
  for a, b in zip(jax.tree.leaves(warm.params["blocks_2"]), jax.tree.leaves(fresh["blocks_2"])):
    assert np.array_equal(np.asarray(a), b)
  assert report["new"] and all(n.startswith("['blocks_2']") for n in report["new"])
  assert len(report["taken"]) == len(jax.tree.leaves(src)) and not report["unused"]
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(warm.opt_state))  # fresh moments
  tx, state, sh = _abstract_setup(tiny_config(**{"model.width": 64}))  # shapes suffice: fails first
  with pytest.raises(UserError, match=r"\['blocks_0'\]\['class_embed'\]: this model \(10, 64\), .*stage1 "
                                      r"\(10, 32\)"):
    warm_start.apply(state, sh, tx, str(tmp_path / "stage1"))


def test_init_from_a_workdir_on_a_fresh_start_only(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  # lr 0 in both runs: b's parameters are exactly the warm ones; a's differ from b's own init (seed 5)
  # in every randomly initialised leaf. One config but the seed (an argument, not a constant, of the
  # compiled programs): run b reuses run a's compilations.
  frozen_lr = {"train.lr": 0.0, "train.init_lr": 0.0, "train.min_lr": 0.0, "train.steps": 1}
  loop.train_and_evaluate(tiny_config(**frozen_lr), str(a))
  assert warm_start.resolve(str(a)) == ("params", str(a / "params_0000001"))
  assert warm_start.resolve(str(a / "checkpoints" / "1")) == ("train", str(a / "checkpoints" / "1"))
  frozen_lr["train.seed"] = 5
  loop.train_and_evaluate(tiny_config(init_from=str(a), **frozen_lr), str(b))
  want = ckpt.load_params(str(a / "params_0000001"))
  got = ckpt.load_params(str(b / "params_0000001"))
  for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    assert np.array_equal(np.asarray(x), np.asarray(y))
  again = loop.train_and_evaluate(tiny_config(init_from=str(tmp_path / "nowhere"), **frozen_lr), str(b))
  assert again["step"] == 1  # resumed from its own checkpoint: init_from ignored
  with pytest.raises(UserError, match="init_from="):
    loop.train_and_evaluate(tiny_config(init_from=str(tmp_path / "nowhere")), str(tmp_path / "c"))
