"""The one-jit train step: sharding equivalence (48), gradient accumulation (45), frozen subtree,
non-finite guard (44)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starflow2_jax import parallel
from starflow2_jax.data import pipeline
from starflow2_jax.train import loop, optimizer, state as state_lib, step as step_lib, tasks
from train_runner import tiny_config

PERTURB = 0.05  # random non-zero weights everywhere (the production zero init of proj_out hides bugs)
# eps = 1 makes AdamW's first update nearly linear in the gradient, so parameter comparisons check the
# gradients themselves (with eps = 1e-8 the first update is ~sign(g) and amplifies rounding).
OVERRIDES = {"train.eps": 1.0}


def _perturbed(init_fn):
  def init(rng):
    params = init_fn(rng)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(123), len(leaves))
    return jax.tree.unflatten(tree, [x + PERTURB * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])
  return init


def _batch(cfg, n, offset=0):
  src = pipeline.build_source(cfg.data, "train")
  return {"image": np.stack([src[i]["image"] for i in range(offset, offset + n)]),
          "label": np.asarray([src[i]["label"] for i in range(offset, offset + n)], np.int32)}


@pytest.fixture(scope="module")
def reference():
  """The tiny flow's perturbed initial state (numpy) and one step of it on a single device."""
  cfg = tiny_config(**OVERRIDES)
  mesh = parallel.make_mesh({"shape": {"data": 1}}, jax.devices()[:1])
  rules = parallel.logical_rules(cfg)
  task = tasks.build_task(cfg, mesh, rules)
  tx = optimizer.make_optimizer(cfg.train)
  state0, _ = state_lib.init_sharded(_perturbed(task.init_fn), tx, jax.random.key(0), mesh, rules, False)
  state0 = jax.tree.map(np.asarray, state0)
  batch = _batch(cfg, cfg.train.batch_size)
  params1, metrics1, _, _ = _run(cfg, state0, {"data": 1}, jax.devices()[:1], task, [batch])
  return cfg, task, state0, batch, params1, metrics1


def _run(cfg, state0, shape, devices, task, batches):
  """Place `state0` on the mesh, take one step per batch. Returns (params numpy, metrics, state, the
  jitted step)."""
  mesh = parallel.make_mesh({"shape": shape}, devices)
  rules = parallel.logical_rules(cfg)
  tx = optimizer.make_optimizer(cfg.train)
  sh = state_lib.state_shardings(_perturbed(task.init_fn), tx, jax.random.key(0), mesh, rules,
                                 use_ema=state0.ema_params is not None)
  state = jax.device_put(state0, sh)
  step = step_lib.make_train_step(task.loss_fn, tx, optimizer.learning_rate_schedule(cfg.train),
                                  cfg.train, mesh, rules, sh, task.frozen_shardings)
  metrics = []
  for b in batches:
    gb = parallel.make_global_batch(b, mesh, cfg.train.batch_size)
    state, m = step(state, task.frozen, gb, jax.random.key(7))
    metrics.append(jax.device_get(m))
  return jax.tree.map(np.asarray, state.params), metrics, state, step


def _close(a, b, tol=1e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.max(np.abs(x - y)) <= tol * max(1.0, np.max(np.abs(y))), np.max(np.abs(x - y))


def _same_loss(m, ref):
  assert abs(float(m["loss"]) - float(ref["loss"])) <= 1e-5 * max(1, abs(float(ref["loss"])))


def test_reference_step_moves_every_parameter(reference):
  _, _, state0, _, params1, metrics1 = reference
  assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state0.params),
                                                        jax.tree.leaves(params1)))
  assert np.isfinite(metrics1[0]["bpd"]) and metrics1[0]["finite"] == 1


def test_params_born_sharded_equal_single_device_init(reference):
  cfg, task, state0, _, _, _ = reference
  mesh = parallel.make_mesh({"shape": {"data": 2, "fsdp": 2, "tensor": 2}})
  tx = optimizer.make_optimizer(cfg.train)
  state, _ = state_lib.init_sharded(_perturbed(task.init_fn), tx, jax.random.key(0), mesh,
                                    parallel.logical_rules(cfg), False)
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
  assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs), specs
  _close(jax.tree.map(np.asarray, state.params), state0.params, tol=0)


@pytest.mark.parametrize("data,fsdp", [(1, 8), (2, 4), (8, 1)])
def test_sharded_step_equals_single_device(data, fsdp, reference):
  cfg, task, state0, batch, params1, metrics1 = reference
  p, m, _, _ = _run(cfg, state0, {"data": data, "fsdp": fsdp}, None, task, [batch])
  _same_loss(m[0], metrics1[0])
  _close(p, params1)


def test_grad_accumulation_equals_full_batch(reference):
  cfg, task, state0, batch, params1, metrics1 = reference
  cfg4 = tiny_config(**OVERRIDES, **{"train.grad_accum": 4})
  p, m, _, _ = _run(cfg4, state0, {"data": 4}, jax.devices()[:4], task, [batch])
  _same_loss(m[0], metrics1[0])
  assert abs(float(m[0]["grad_norm"]) - float(metrics1[0]["grad_norm"])) <= 1e-5 * float(
      metrics1[0]["grad_norm"])
  _close(p, params1)


def _frozen_task(cfg, mesh, poison=False):
  """The tiny flow with a frozen tensor that scales the loss (and a NaN switch in the batch)."""
  base = tasks.build_task(cfg, mesh, parallel.logical_rules(cfg))
  frozen = {"scale": jnp.asarray(np.linspace(0.5, 1.5, 8), jnp.float32)}

  def loss_fn(params, frozen, batch, rng):
    loss, metrics = base.loss_fn(params, None, batch, rng)
    loss = loss * jnp.mean(frozen["scale"])
    if poison:
      loss = loss * jnp.where(jnp.any(batch["label"] < 0), jnp.nan, 1.0)
    return loss, metrics

  return tasks.Task(init_fn=base.init_fn, loss_fn=loss_fn, eval_fn=base.eval_fn, sample_fn=None,
                    tokens_per_example=base.tokens_per_example, num_classes=base.num_classes,
                    frozen=frozen, frozen_shardings={"scale": parallel.replicated(mesh)})


def test_frozen_subtree_ema_and_nonfinite_skip(reference):
  """Frozen tensors stay bit-identical (and alive: never donated); the EMA follows the parameters; a
  NaN step leaves parameters, optimizer state and EMA bit-identical and counts the skip; the next
  finite step proceeds."""
  _, _, state0, good, _, _ = reference
  cfg = tiny_config(**OVERRIDES, **{"train.ema_decay": 0.9})
  state0 = state0.replace(ema_params=state0.params)
  mesh = parallel.make_mesh({"shape": {"data": 2}}, jax.devices()[:2])
  task = _frozen_task(cfg, mesh, poison=True)
  frozen_before = np.asarray(task.frozen["scale"])
  bad = dict(good, label=np.where(np.arange(len(good["label"])) == 3, -1, good["label"]))
  p1, m, state, step = _run(cfg, state0, {"data": 2}, jax.devices()[:2], task, [good])
  ema = jax.tree.map(np.asarray, state.ema_params)
  _close(ema, jax.tree.map(lambda a, b: 0.9 * a + 0.1 * b, state0.params, p1), tol=1e-6)
  snap = jax.tree.map(np.asarray, (state.params, state.opt_state, state.ema_params))
  s2, m2 = step(state, task.frozen, parallel.make_global_batch(bad, mesh, 16), jax.random.key(7))
  assert int(m2["finite"]) == 0 and int(s2.skipped) == 1 and int(s2.step) == 2
  after = jax.tree.map(np.asarray, (s2.params, s2.opt_state, s2.ema_params))
  for a, b in zip(jax.tree.leaves(snap), jax.tree.leaves(after)):
    assert np.array_equal(a, b)
  s3, m3 = step(s2, task.frozen, parallel.make_global_batch(good, mesh, 16), jax.random.key(7))
  assert int(m3["finite"]) == 1 and int(s3.skipped) == 1
  assert not np.array_equal(np.asarray(jax.tree.leaves(s3.params)[0]), jax.tree.leaves(snap)[0])
  assert np.array_equal(np.asarray(task.frozen["scale"]), frozen_before)


def test_nonfinite_stop_mode_raises_clear_error(tmp_path):
  cfg = tiny_config(**{"train.nonfinite": "stop", "train.steps": 3})
  mesh = parallel.make_mesh(cfg.mesh)
  base = tasks.build_task(cfg, mesh, parallel.logical_rules(cfg))
  nan_task = tasks.Task(init_fn=base.init_fn, loss_fn=lambda p, f, b, r: (
      base.loss_fn(p, f, b, r)[0] * jnp.nan, {}), eval_fn=base.eval_fn, sample_fn=None,
      tokens_per_example=base.tokens_per_example)
  with pytest.raises(loop.NonFiniteError, match="not finite.*train.nonfinite='skip'"):
    loop.train_and_evaluate(cfg, str(tmp_path), task=nan_task)
