"""The FAE task (REFERENCE-BEHAVIOURS 57): a frozen trunk stays bit-identical through train steps while
the head trains; a jointly trained trunk changes and its feature target is stop-gradient; a tiny run of
the loop exports the FAE with latent statistics that `load_fae` reads and that normalise its latents;
config mistakes fail naming the field."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fae_shapesworld
from starflow2_jax import parallel
from starflow2_jax.errors import UserError
from starflow2_jax.fae import load_fae
from starflow2_jax.train import fae_task, loop, optimizer, state as state_lib, step as step_lib
from test_fae import tiny_fae_config


def tiny_config(**fae_overrides):
  c = fae_shapesworld.get_config()
  c.fae = tiny_fae_config()
  c.fae.update(fae_overrides)
  c.data.image_size = 16
  c.data.shapes_num_train = 64
  c.data.shapes_num_test = 16
  c.train.batch_size = 8
  c.train.steps = 3
  c.train.warmup = 0
  c.train.lr = 1e-2
  c.fae.stats_images = 40
  c.checkpoint.every = 100
  c.log.every = 1
  c.log.sample_every = 0
  c.log.num_samples = 4
  c.log.eval_examples = 8
  return c


def _steps(config, n=2):
  """n train steps of the task on a (data=8) mesh -> (task, params before, params after)."""
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.logical_rules(config)
  task = fae_task.build(config, mesh, rules)
  rng = jax.random.key(0)
  tx, _, trainable = optimizer.for_task(config.train, task, rng)
  state, state_sh = state_lib.init_sharded(task.init_fn, tx, rng, mesh, rules, False)
  before = jax.tree.map(np.asarray, state.params)
  step = step_lib.make_train_step(task.loss_fn, tx, optimizer.learning_rate_schedule(config.train),
                                  config.train, mesh, rules, state_sh, task.frozen_shardings,
                                  objective=task.objective, trainable=trainable)
  images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
  batch = parallel.make_global_batch({"image": images}, mesh, 8)
  for _ in range(n):
    state, metrics = step(state, task.frozen, batch, rng)
  assert int(metrics["finite"]) == 1
  return task, before, jax.tree.map(np.asarray, state.params), images


def _changed(a, b):
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_frozen_trunk_is_bit_identical_while_the_head_trains():
  config = tiny_config(phase="head", train_encoder=False)
  task, before, after, _ = _steps(config)
  assert sorted(after) == ["feature_decoder", "head"] and sorted(task.frozen) == ["pixel_decoder", "trunk"]
  trunk_before = jax.tree.map(np.asarray, task.frozen["trunk"])
  assert _changed(before["head"], after["head"])
  assert not _changed(trunk_before, jax.tree.map(np.asarray, task.frozen["trunk"]))
  assert task.objective == {"feature_mse": 1.0, "kl": config.fae.beta_kl}


def test_joint_trunk_trains_and_the_feature_target_is_stop_gradient():
  config = tiny_config()
  task, before, after, images = _steps(config, n=1)
  assert _changed(before["trunk"], after["trunk"])
  fae = fae_task.FAE(config.fae)
  batch = {"image": jnp.asarray(images), "pos": jnp.arange(8, dtype=jnp.int32)}
  rng = jax.random.key(3)
  target = fae.trunk_features(before["trunk"], batch["image"])  # a constant: no gradient through it

  def feature_term(trunk):
    return task.loss_fn(dict(before, trunk=trunk), None, batch, rng)["feature_mse"][0]

  def reference(trunk):  # the same term with the target as a constant
    p = dict(before, trunk=trunk)
    x = fae.trunk_features(trunk, batch["image"])
    mean, logvar = fae.posterior(p, x)
    keys = jax.vmap(lambda q: jax.random.fold_in(rng, q))(batch["pos"])
    z = jax.vmap(lambda k, m, lv: fae_task.reparameterise(jax.random.fold_in(k, fae_task._SAMPLE), m,
                                                          lv))(keys, mean, logvar)
    return jnp.sum(jnp.mean(jnp.square(fae.decode_features(p, z) - target), axis=(1, 2)))

  got, want = jax.jit(lambda t: (jax.grad(feature_term)(t), jax.grad(reference)(t)))(before["trunk"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), got, want)
  assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(got))  # the latent path


def test_tiny_run_exports_an_fae_with_latent_statistics(tmp_path):
  config = tiny_config()
  summary = loop.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(summary["eval"]["psnr"]) and "feature_mse" in summary["eval"]
  assert os.path.isfile(summary["samples"])
  fae, params = load_fae(summary["export"])
  assert fae.grid == (4, 4) and sorted(params) == sorted(
      ["trunk", "head", "feature_decoder", "pixel_decoder", "latent_stats"])
  # the statistics normalise the posterior means of the images they were computed over
  from starflow2_jax.data import pipeline
  source = pipeline.build_source(config.data, "train")
  images = next(pipeline.eval_batches(config.data, source, 40, fae_task.ImageOnly(), 40))["image"]
  z = np.asarray(jax.jit(fae.encode)(params, images), np.float64).reshape(-1, fae.channels)
  np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(z.std(0), 1.0, atol=1e-3)
  assert json.load(open(os.path.join(summary["export"], "meta.json")))["source"] == "launch.train"


@pytest.mark.parametrize("overrides,match", [
    (dict(phase="joint", train_encoder=False), "fae.phase='joint' trains the trunk"),
    (dict(phase="head", train_encoder=True), "fae.phase='head' keeps the DINOv2 trunk frozen"),
    (dict(phase="pixel_recon", train_encoder=False), "fae.phase='pixel_recon' decodes the frozen head's"),
])
def test_phase_mistakes(overrides, match):
  config = tiny_config(**overrides)
  with pytest.raises(UserError, match=match):
    fae_task.build(config, parallel.make_mesh(config.mesh), parallel.logical_rules(config))


def test_data_must_match_the_fae(tmp_path):
  config = tiny_config()
  config.data.image_size = 32
  with pytest.raises(UserError, match=r"data.image_size=32.*takes 16x16 RGB images"):
    fae_task.build(config, parallel.make_mesh(config.mesh), parallel.logical_rules(config))
