"""The one-jit train step: sharding equivalence of the loss, every gradient leaf, grad_norm and the
updated parameters (48), gradient accumulation (45), the frozen subtree, non-finite guard (44), and the
training path's label dropout."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starflow2_jax import parallel
from starflow2_jax.data import pipeline
from starflow2_jax.train import flow_task, loop, optimizer, state as state_lib, step as step_lib, tasks
from train_runner import tiny_config

PERTURB = 0.05  # random non-zero weights everywhere (the production zero init of proj_out hides bugs)
# eps = 1 makes AdamW's first update nearly linear in the gradient, so parameter comparisons check the
# gradients themselves (with eps = 1e-8 the first update is ~sign(g) and amplifies rounding).
OVERRIDES = {"train.eps": 1.0}
TOL = 1e-5  # float32 sharded vs single device, relative to the leaf's largest magnitude
MESHES = [({"data": 1, "fsdp": 8}), ({"data": 2, "fsdp": 4}), ({"data": 8, "fsdp": 1}),
          ({"data": 1, "tensor": 8}), ({"data": 2, "tensor": 4}), ({"data": 8, "tensor": 1})]


def _perturbed(init_fn):
  def init(rng):
    params = init_fn(rng)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(123), len(leaves))
    return jax.tree.unflatten(tree, [x + PERTURB * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])
  return init


_SOURCES = {}  # the digits train split per (image_size, channels): built once, not per batch


def _batch(cfg, n, offset=0):
  key = (cfg.data.name, cfg.data.image_size, cfg.data.channels)
  if key not in _SOURCES:
    _SOURCES[key] = pipeline.build_source(cfg.data, "train")
  src = _SOURCES[key]
  return {"image": np.stack([src[i]["image"] for i in range(offset, offset + n)]),
          "label": np.asarray([src[i]["label"] for i in range(offset, offset + n)], np.int32)}


def _tx(cfg, task):
  return optimizer.for_task(cfg.train, task, jax.random.key(0))[0]


@pytest.fixture(scope="module")
def reference():
  """The tiny flow's perturbed initial state (numpy) and one step of it on a single device."""
  cfg = tiny_config(**OVERRIDES)
  mesh = parallel.make_mesh({"shape": {"data": 1}}, jax.devices()[:1])
  rules = parallel.logical_rules(cfg)
  task = tasks.build_task(cfg, mesh, rules)
  state0, _ = state_lib.init_sharded(_perturbed(task.init_fn), _tx(cfg, task), jax.random.key(0), mesh,
                                     rules, False)
  state0 = jax.tree.map(np.asarray, state0)
  batch = _batch(cfg, cfg.train.batch_size)
  params1, metrics1, _, _, grads1 = _run(cfg, state0, {"data": 1}, jax.devices()[:1], task, [batch])
  return cfg, task, state0, batch, params1, metrics1, grads1


def _run(cfg, state0, shape, devices, task, batches):
  """Place `state0` on the mesh, take one step per batch. Returns (params numpy, metrics, state, the
  jitted step, the last step's gradients numpy)."""
  mesh = parallel.make_mesh({"shape": shape}, devices)
  rules = parallel.logical_rules(cfg)
  tx = _tx(cfg, task)
  sh = state_lib.state_shardings(_perturbed(task.init_fn), tx, jax.random.key(0), mesh, rules,
                                 use_ema=state0.ema_params is not None)
  state = jax.device_put(state0, sh)
  step = step_lib.make_train_step(task.loss_fn, tx, optimizer.learning_rate_schedule(cfg.train),
                                  cfg.train, mesh, rules, sh, task.frozen_shardings,
                                  objective=task.objective, return_grads=True)
  metrics, grads = [], None
  for b in batches:
    gb = parallel.make_global_batch(b, mesh, cfg.train.batch_size)
    state, m, grads = step(state, task.frozen, gb, jax.random.key(7))
    metrics.append(jax.device_get(m))
  return (jax.tree.map(np.asarray, state.params), metrics, state, step,
          jax.tree.map(np.asarray, grads))


def _close(a, b, tol=TOL):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    err = np.max(np.abs(np.asarray(x) - np.asarray(y)))
    assert err <= tol * max(1e-3, np.max(np.abs(y))), (jax.tree_util.keystr(path), err)


def _same_scalar(m, ref, name):
  assert abs(float(m[name]) - float(ref[name])) <= TOL * max(1, abs(float(ref[name]))), name


def test_reference_step_moves_every_parameter_by_its_gradient(reference):
  """Every leaf has a non-zero gradient (read from the step itself) and the step moves it."""
  _, _, state0, _, p1, m, g = reference
  for (path, a), b, gl in zip(jax.tree_util.tree_flatten_with_path(state0.params)[0],
                              jax.tree.leaves(p1), jax.tree.leaves(g)):
    assert np.any(gl != 0) and not np.array_equal(a, b), jax.tree_util.keystr(path)
  assert np.isfinite(m[0]["bpd"]) and m[0]["finite"] == 1


def test_params_born_sharded_equal_single_device_init(reference):
  cfg, task, state0, _, _, _, _ = reference
  mesh = parallel.make_mesh({"shape": {"data": 2, "fsdp": 2, "tensor": 2}})
  state, _ = state_lib.init_sharded(_perturbed(task.init_fn), _tx(cfg, task), jax.random.key(0), mesh,
                                    parallel.logical_rules(cfg), False)
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(state.params)}
  assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs), specs
  _close(jax.tree.map(np.asarray, state.params), state0.params, tol=0)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(f"{k}{v}" for k, v in s.items()))
def test_sharded_step_equals_single_device(shape, reference):
  """Loss, grad_norm, every gradient leaf and the updated parameters, on (data, fsdp) and (data,
  tensor) meshes."""
  cfg, task, state0, batch, params1, metrics1, grads1 = reference
  p, m, _, _, g = _run(cfg, state0, shape, None, task, [batch])
  for name in ("loss", "grad_norm", "bpd"):
    _same_scalar(m[0], metrics1[0], name)
  _close(g, grads1)
  _close(p, params1)


def test_grad_accumulation_equals_full_batch(reference):
  cfg, task, state0, batch, params1, metrics1, grads1 = reference
  cfg4 = tiny_config(**OVERRIDES, **{"train.grad_accum": 4})
  p, m, _, _, g = _run(cfg4, state0, {"data": 4}, jax.devices()[:4], task, [batch])
  for name in ("loss", "grad_norm", "bpd"):
    _same_scalar(m[0], metrics1[0], name)
  _close(g, grads1)
  _close(p, params1)


def _frozen_task(cfg, mesh, poison=False):
  """The tiny flow with a frozen tensor (a shape no parameter has) that scales the loss, and a NaN
  switch in the batch."""
  base = tasks.build_task(cfg, mesh, parallel.logical_rules(cfg))
  frozen = {"scale": jnp.asarray(np.linspace(0.5, 1.5, 15).reshape(3, 5), jnp.float32)}

  def loss_fn(params, frozen, batch, rng):
    terms = base.loss_fn(params, None, batch, rng)
    s, c = terms["nll"]
    s = s * jnp.mean(frozen["scale"])
    if poison:
      s = s * jnp.where(jnp.any(batch["label"] < 0), jnp.nan, 1.0)
    return dict(terms, nll=(s, c))

  return dataclasses.replace(base, loss_fn=loss_fn, sample_fn=None, frozen=frozen,
                             frozen_shardings={"scale": parallel.replicated(mesh)})


def test_frozen_subtree_ema_and_nonfinite_skip(reference):
  """The frozen subtree gets no gradient and no optimizer state and stays alive (never donated); the
  EMA follows the parameters; a NaN step leaves parameters, optimizer state and EMA bit-identical and
  counts the skip; the next finite step proceeds."""
  _, _, state0, good, _, _, _ = reference
  cfg = tiny_config(**OVERRIDES, **{"train.ema_decay": 0.9})
  state0 = state0.replace(ema_params=state0.params)
  mesh = parallel.make_mesh({"shape": {"data": 2}}, jax.devices()[:2])
  task = _frozen_task(cfg, mesh, poison=True)
  bad = dict(good, label=np.where(np.arange(len(good["label"])) == 3, -1, good["label"]))
  p1, m, state, step, grads = _run(cfg, state0, {"data": 2}, jax.devices()[:2], task, [good])
  assert jax.tree.structure(grads) == jax.tree.structure(state0.params)  # params only: no frozen leaf
  assert not [x for x in jax.tree.leaves(state.opt_state) if x.shape == task.frozen["scale"].shape]
  ema = jax.tree.map(np.asarray, state.ema_params)
  _close(ema, jax.tree.map(lambda a, b: 0.9 * a + 0.1 * b, state0.params, p1), tol=1e-6)
  snap = jax.tree.map(np.asarray, (state.params, state.opt_state, state.ema_params))
  s2, m2, _ = step(state, task.frozen, parallel.make_global_batch(bad, mesh, 16), jax.random.key(7))
  assert int(m2["finite"]) == 0 and int(s2.skipped) == 1 and int(s2.step) == 2
  after = jax.tree.map(np.asarray, (s2.params, s2.opt_state, s2.ema_params))
  for a, b in zip(jax.tree.leaves(snap), jax.tree.leaves(after)):
    assert np.array_equal(a, b)
  s3, m3, _ = step(s2, task.frozen, parallel.make_global_batch(good, mesh, 16), jax.random.key(7))
  assert int(m3["finite"]) == 1 and int(s3.skipped) == 1
  assert not np.array_equal(np.asarray(jax.tree.leaves(s3.params)[0]), jax.tree.leaves(snap)[0])
  assert not task.frozen["scale"].is_deleted()


def test_nonfinite_stop_mode_raises_clear_error(tmp_path):
  cfg = tiny_config(**{"train.nonfinite": "stop", "train.steps": 3})
  mesh = parallel.make_mesh(cfg.mesh)
  base = tasks.build_task(cfg, mesh, parallel.logical_rules(cfg))
  nan_task = dataclasses.replace(base, sample_fn=None, loss_fn=lambda p, f, b, r: {
      t: (s * jnp.nan, c) for t, (s, c) in base.loss_fn(p, f, b, r).items()})
  with pytest.raises(loop.NonFiniteError, match="not finite.*train.nonfinite='skip'"):
    loop.train_and_evaluate(cfg, str(tmp_path), task=nan_task)


def test_label_dropout_rate_and_determinism_in_rng_and_pos():
  rng, n, rate = jax.random.key(3), 20_000, 0.1
  labels = jnp.arange(n, dtype=jnp.int32) % 10
  pos = jnp.arange(n, dtype=jnp.int32)
  dropped = np.asarray(flow_task.drop_labels(rng, pos, labels, rate)) == -1
  assert abs(dropped.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / n)  # 4 sigma
  kept = np.asarray(flow_task.drop_labels(rng, pos, labels, rate))
  assert np.array_equal(kept[~dropped], np.asarray(labels)[~dropped])
  # a function of (rng, pos) only: the same positions in another order, inside another batch
  perm = np.random.default_rng(0).permutation(n)[:500]
  sub = np.asarray(flow_task.drop_labels(rng, pos[perm], labels[perm], rate)) == -1
  assert np.array_equal(sub, dropped[perm])
  other = np.asarray(flow_task.drop_labels(jax.random.key(4), pos, labels, rate)) == -1
  assert (other != dropped).mean() > rate  # another rng drops other examples
  assert not np.any(np.asarray(flow_task.drop_labels(rng, pos, labels, 0.0)) == -1)


def test_dropped_label_gives_the_mean_class_embedding(reference):
  """Through the training loss: label -1 (dropped) scores an image like a class whose embedding row is
  the mean of the table, and unlike any real class."""
  _, _, state0, b, _, _, _ = reference  # the same architecture: label_drop changes no parameter
  cfg = tiny_config(**{"model.label_drop": 0.0})
  mesh = parallel.make_mesh({"shape": {"data": 1}}, jax.devices()[:1])
  task = tasks.build_task(cfg, mesh, parallel.logical_rules(cfg))
  params = jax.tree.map(jnp.asarray, state0.params)
  batch = {"image": jnp.asarray(b["image"][:4]), "pos": jnp.arange(4, dtype=jnp.int32)}
  loss = jax.jit(lambda p, labels: task.loss_fn(p, None, dict(batch, label=labels),
                                                jax.random.key(1))["nll"][0])  # one compile, 3 calls

  def nll(p, labels):
    return float(loss(p, jnp.asarray(labels, jnp.int32)))

  mean_row0 = {k: dict(v, class_embed=v["class_embed"].at[0].set(jnp.mean(v["class_embed"], 0)))
               for k, v in params.items()}
  dropped = nll(params, [-1] * 4)
  assert abs(dropped - nll(mean_row0, [0] * 4)) <= 1e-5 * abs(dropped)
  assert abs(dropped - nll(params, [0] * 4)) > 1e-3 * abs(dropped)
