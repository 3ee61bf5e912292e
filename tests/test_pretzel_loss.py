"""The STARFlow2 losses (STARFLOW2.md 5.1-5.3; REFERENCE-BEHAVIOURS C, G 45, H 48): L_NF per image from
the three blocks' per-dimension log-dets and the prior, its image mean over flow-loss images, the
latent-norm regulariser, latent NLL in nats/dim, L_NTP as a token mean with padded vocabulary rows
masked, zero counts, and exactness of the global means under gradient accumulation and meshes."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pretzel_tiny as pt
from starflow2_jax import parallel
from starflow2_jax.pretzel import loss as ploss, model as pmodel, stages
from starflow2_jax.train import step as step_lib

# Rows with uneven numbers of supervised tokens and flow-loss images (strided micro-batches differ).
ROWS = [[[5, ("img", True), 3]], [[("img", False), 9]], [[2, ("img", True), 1]], [[14]],
        [[3, ("img", True), 6]], [[("img", False), 2]], [[7]], [[1, ("img", True), 12]]]
L, I = 40, 1
REG = 1e-4


@pytest.fixture(scope="module")
def tiny():
  cfg, model, vlm, params, vp = pt.build()
  batch = pt.sequence(ROWS, L, I)
  batch["x"] = np.asarray(pt.latents(len(ROWS), I))
  return cfg, model, vlm, pt.perturbed(params, scale=0.1), vp, batch


def test_flow_loss_per_image_and_latent_nll(tiny):
  """L_NF^(i) = mean_{n,c}[0.5 z^2 - l_D - l_S0 - l_S1]; "nf" = (sum over flow-loss images of L_NF +
  reg * sum_k mean u_k^2, their count); "latent_nll" adds 0.5 log 2 pi."""
  cfg, _, _, params, vp, batch = tiny
  out, _ = pt.forward_fn()(params, vp, pt.inputs_of(batch), jnp.asarray(batch["x"]))
  z, ld = np.asarray(out.z, np.float64), np.asarray(out.deep_logdet, np.float64)
  s0, s1 = (np.asarray(a, np.float64) for a in out.shallow_logdets)
  want = np.mean(0.5 * z ** 2 - ld - s0 - s1, axis=(2, 3))
  np.testing.assert_allclose(np.asarray(ploss.image_nll(out)), want, rtol=1e-5, atol=1e-6)
  u0, u1 = (np.asarray(a, np.float64) for a in out.shallow_outputs)
  assert np.array_equal(np.asarray(u1), np.asarray(out.u))  # the last shallow output is the deep input
  norm = np.mean(u0 ** 2, axis=(2, 3)) + np.mean(u1 ** 2, axis=(2, 3))
  terms = ploss.batch_terms(ploss.per_example(out, batch, cfg.text_vocab, REG))
  flow = batch["image_flow_loss"] & batch["image_valid"]
  assert float(terms["nf"][1]) == flow.sum() == 4
  np.testing.assert_allclose(float(terms["nf"][0]), np.sum((want + REG * norm)[flow]), rtol=1e-5)
  np.testing.assert_allclose(float(terms["latent_nll"][0]),
                             np.sum(want[flow] + 0.5 * math.log(2 * math.pi)), rtol=1e-5)


def test_text_loss_is_a_token_mean_with_padded_rows_masked(tiny):
  cfg, _, _, params, vp, batch = tiny
  out, _ = pt.forward_fn()(params, vp, pt.inputs_of(batch), jnp.asarray(batch["x"]))
  logits = np.asarray(out.logits, np.float64)
  vocab = 200  # rows >= 200 play the embedding's padding rows
  lg = logits[..., :vocab]
  logp = lg - np.log(np.sum(np.exp(lg - lg.max(-1, keepdims=True)), -1, keepdims=True)) - \
      lg.max(-1, keepdims=True)
  targets = np.minimum(batch["targets"], vocab - 1)
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  mask = batch["target_mask"]
  terms = ploss.batch_terms(ploss.per_example(out, dict(batch, targets=targets), vocab, REG))
  assert float(terms["ntp"][1]) == mask.sum() and len(set(mask.sum(1))) > 3
  np.testing.assert_allclose(float(terms["ntp"][0]), np.sum(ce[mask]), rtol=1e-5)


def test_zero_counts_give_zero_terms_not_nan(tiny):
  cfg, _, _, params, vp, batch = tiny
  out, _ = pt.forward_fn()(params, vp, pt.inputs_of(batch), jnp.asarray(batch["x"]))
  none = dict(batch, image_flow_loss=np.zeros_like(batch["image_flow_loss"]),
              target_mask=np.zeros_like(batch["target_mask"]))
  terms = ploss.batch_terms(ploss.per_example(out, none, cfg.text_vocab, REG))
  for name, (s, c) in terms.items():
    assert float(s) == 0.0 and float(c) == 1.0, name


def _grads_fn(model, vlm, cfg, k, mesh):
  s = stages.stage(3)

  def loss_fn(params, frozen, batch, rng):
    inputs = {n: batch[n] for n in pmodel.INPUT_KEYS}
    out = pmodel.forward(model, params, vlm, frozen, inputs, batch["x"], s.mode)
    return ploss.batch_terms(ploss.per_example(out, batch, cfg.text_vocab, REG))

  fn = step_lib.make_grads_fn(loss_fn, stages.objective(3, 0.7), k, mesh)
  rules = parallel.DEFAULT_LOGICAL_RULES

  def run(params, vp, batch):
    with parallel.sharding_context(mesh, rules):
      gb = parallel.make_global_batch(batch, mesh, len(ROWS))
      return jax.jit(fn)(params, vp, gb, jax.random.key(0))
  return run


def _compare(a, b):
  (la, ma, ga), (lb, mb, gb) = a, b
  assert abs(float(la) - float(lb)) <= 1e-5 * max(1.0, abs(float(lb)))
  for t in ("nf", "ntp", "latent_nll"):
    assert abs(float(ma[t]) - float(mb[t])) <= 1e-5 * max(1.0, abs(float(mb[t]))), t
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(ga)[0], jax.tree.leaves(gb)):
    x, y = np.asarray(x), np.asarray(y)
    assert np.max(np.abs(x - y)) <= 1e-5 * max(1e-3, np.max(np.abs(y))), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def reference(tiny):
  cfg, model, vlm, params, vp, batch = tiny
  one = parallel.make_mesh({"shape": {"data": 1}}, jax.devices()[:1])
  return _grads_fn(model, vlm, cfg, 1, one)(params, vp, batch)


def test_global_means_are_exact_under_grad_accumulation(tiny, reference):
  """45: 4 strided micro-batches (uneven supervised tokens and flow images) on a (data 2, tensor 4)
  mesh give the single-device loss, metrics and gradients (stage-3 objective L_NF + 0.7 L_NTP)."""
  cfg, model, vlm, params, vp, batch = tiny
  mesh = parallel.make_mesh({"shape": {"data": 2, "tensor": 4}})
  _compare(_grads_fn(model, vlm, cfg, 4, mesh)(params, vp, batch), reference)
  loss, metrics, _ = reference
  assert abs(float(loss) - (float(metrics["nf"]) + 0.7 * float(metrics["ntp"]))) <= 1e-5 * float(loss)


@pytest.mark.slow  # two more compilations of the gradient
@pytest.mark.parametrize("shape", [{"fsdp": 8}, {"data": 8}], ids=["fsdp8", "data8"])
def test_global_means_are_exact_on_meshes(tiny, reference, shape):
  """48: (1, 8) over fsdp and (8, 1) over data equal the single device (with (2, 4) above)."""
  cfg, model, vlm, params, vp, batch = tiny
  mesh = parallel.make_mesh({"shape": {"data": 1, **shape}})
  _compare(_grads_fn(model, vlm, cfg, 1, mesh)(params, vp, batch), reference)
