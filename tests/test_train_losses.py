"""Exact (sum, count) losses (45, 48): a token mean over the global batch, with uneven numbers of
supervised tokens per micro-batch, is the same for any grad_accum (float64, 1e-10) and on (data, fsdp)
meshes (1,8), (2,4), (8,1) as on one device; a two-term objective keeps each term's own normaliser."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from starflow2_jax import parallel
from starflow2_jax.errors import UserError
from starflow2_jax.train import loop, state as state_lib, step as step_lib
from starflow2_jax.train.task import Task

B, T, D, K = 16, 16, 8, 4  # examples, tokens per example, features, micro-batches
OBJECTIVE = {"token": 1.0, "example": 0.5}
MESHES = [{"data": 1, "fsdp": 8}, {"data": 2, "fsdp": 4}, {"data": 8, "fsdp": 1}]


def _supervised(r):
  """Supervised tokens of row r: micro-batch r % K gets 1, 6, 11 or 16 tokens per row (uneven)."""
  return 1 + 5 * (r % K)


def _data(dtype):
  rng = np.random.default_rng(0)
  mask = np.zeros((B, T), dtype)
  for r in range(B):
    mask[r, :_supervised(r)] = 1
  return ({"x": rng.normal(size=(B, T, D)).astype(dtype), "y": rng.normal(size=(B, T)).astype(dtype),
           "mask": mask}, {"w": rng.normal(size=(D,)).astype(dtype)})


def loss_fn(params, frozen, batch, rng):
  """token: squared error per supervised token (a token mean); example: a per-example term."""
  del frozen, rng
  err = jnp.square(batch["x"] @ params["w"] - batch["y"])
  per_example = jnp.mean(jnp.tanh(batch["x"] @ params["w"]), axis=1)
  n = jnp.asarray(batch["x"].shape[0], err.dtype)
  return {"token": (jnp.sum(batch["mask"] * err), jnp.sum(batch["mask"])),
          "example": (jnp.sum(per_example), n)}


def _numpy_objective(batch, w):
  err = np.square(batch["x"] @ w - batch["y"])
  token = np.sum(batch["mask"] * err) / np.sum(batch["mask"])
  return token + 0.5 * np.mean(np.mean(np.tanh(batch["x"] @ w), axis=1)), token


def _numpy_grad(batch, w):
  pred = batch["x"] @ w
  g_tok = 2 * np.einsum("bt,btd->d", batch["mask"] * (pred - batch["y"]), batch["x"]) / batch["mask"].sum()
  g_ex = np.einsum("bt,btd->d", 1 - np.tanh(pred) ** 2, batch["x"]) / (B * T)
  return g_tok + 0.5 * g_ex


def test_token_mean_is_exact_for_any_grad_accum_float64(x64):
  batch, params = _data(np.float64)
  mesh = parallel.make_mesh({"shape": {"data": 1}}, jax.devices()[:1])
  want_loss, want_token = _numpy_objective(batch, params["w"])
  want_grad = _numpy_grad(batch, params["w"])
  micro_means = [np.sum((batch["mask"] * np.square(batch["x"] @ params["w"] - batch["y"]))[i::K]) /
                 np.sum(batch["mask"][i::K]) for i in range(K)]
  assert abs(np.mean(micro_means) - want_token) > 1e-2 * want_token  # the naive mean would be wrong
  for k in (1, 2, K):
    grads_fn = jax.jit(step_lib.make_grads_fn(loss_fn, OBJECTIVE, k, mesh))
    loss, metrics, grads = grads_fn(params, None, batch, jax.random.key(0))
    assert loss.dtype == jnp.float64 and grads["w"].dtype == jnp.float64
    assert abs(float(loss) - want_loss) <= 1e-10 * abs(want_loss), k
    assert abs(float(metrics["token"]) - want_token) <= 1e-10 * want_token, k
    np.testing.assert_allclose(np.asarray(grads["w"]), want_grad, rtol=1e-10, atol=0)


def test_only_trainable_leaves_are_differentiated(x64):
  batch, params = _data(np.float64)
  params = dict(params, v=np.ones((3,)))
  mesh = parallel.make_mesh({"shape": {"data": 1}}, jax.devices()[:1])
  grads_fn = step_lib.make_grads_fn(loss_fn, OBJECTIVE, K, mesh, trainable={"v": True, "w": False})
  _, _, grads = jax.jit(grads_fn)(params, None, batch, jax.random.key(0))
  assert not np.any(np.asarray(grads["w"]))  # frozen group: zero (its gradient is not computed)
  assert np.any(_numpy_grad(batch, params["w"]))  # ... where the loss does depend on it


def _train(shape, grad_accum, devices=None):
  batch, params = _data(np.float32)
  mesh = parallel.make_mesh({"shape": shape}, devices)
  rules = parallel.logical_rules(None)
  train = ml_collections.ConfigDict({"grad_accum": grad_accum, "ema_decay": 0.0})
  tx = optax.sgd(0.1)
  init_fn = lambda rng: {"w": nn.LogicallyPartitioned(jnp.asarray(params["w"]), ("embed",))}  # noqa: E731
  sh = state_lib.state_shardings(init_fn, tx, jax.random.key(0), mesh, rules, False)
  state = jax.device_put(state_lib.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                                              ema_params=None, skipped=jnp.int32(0)), sh)
  step = step_lib.make_train_step(loss_fn, tx, optax.constant_schedule(0.1), train, mesh, rules, sh, None,
                                  objective=OBJECTIVE, return_grads=True)
  _, m, g = step(state, None, parallel.make_global_batch(batch, mesh, B), jax.random.key(0))
  return jax.device_get(m), np.asarray(g["w"])


@pytest.mark.parametrize("shape", MESHES, ids=str)
def test_token_mean_on_meshes_equals_one_device(shape):
  m1, g1 = _train({"data": 1}, 1, jax.devices()[:1])
  batch, params = _data(np.float64)
  want_loss, want_token = _numpy_objective(batch, params["w"])
  assert abs(float(m1["loss"]) - want_loss) <= 1e-6 * abs(want_loss)
  for k in (1, 2):
    m, g = _train(shape, k)
    for name in ("loss", "token", "example", "grad_norm"):
      assert abs(float(m[name]) - float(m1[name])) <= 1e-6 * max(1.0, abs(float(m1[name]))), (name, k)
    np.testing.assert_allclose(g, g1, rtol=1e-5, atol=1e-6)


def test_objective_must_name_loss_terms():
  mesh = parallel.make_mesh({"shape": {"data": 1}}, jax.devices()[:1])
  batch, params = _data(np.float32)
  with pytest.raises(UserError, match=r"missing: \['nll'\]"):
    step_lib.make_grads_fn(loss_fn, {"nll": 1.0}, 1, mesh)(params, None, batch, jax.random.key(0))


# -- held-out metrics: a (sum, count) metric with no counted example over the split ------------------
class _Src:
  def __len__(self): return 5
  def __getitem__(self, i): return {"image": np.full((2, 2, 1), i, np.uint8), "label": np.int32(i)}

class _Ids:
  def __call__(self, r): return {"x": np.float32(r["label"])}

def test_zero_count_metric_is_left_out():
  task = Task(record_transform=_Ids(), init_fn=None, loss_fn=None, objective={}, sample_fn=None,
              eval_fn=lambda p, f, b, r: {"mean_x": b["x"], "none": (b["x"], jnp.zeros_like(b["x"]))},
              param_labels=None, headline="", tokens_per_example=1)
  data = ml_collections.ConfigDict({"image_size": 2, "channels": 1})
  mesh = parallel.make_mesh(ml_collections.ConfigDict({"shape": {"data": -1, "fsdp": 1, "tensor": 1}}))
  out = loop.evaluate(task, {}, None, data, _Src(), mesh, parallel.DEFAULT_LOGICAL_RULES, 4,
                      jax.random.key(0))
  assert out == {"mean_x": 2.0}
