"""Sampling: REFERENCE-BEHAVIOURS properties 20-26 (cached sampling, Jacobi, guidance, determinism,
Tweedie denoising, zero temperature)."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flow_utils import assert_close_to_scale, build, np64, reverse_fn, tiny_config

from starflow2_jax import flows
from starflow2_jax.flows import Guidance, Jacobi

CASES = {
    "tarflow_cond": dict(parametrisation="tarflow", layers=(1, 1), num_classes=3),
    "starflow_prefix": dict(parametrisation="starflow", layers=(1, 1), context_dim=8),
    "starflow2_shallow": dict(parametrisation="starflow", layers=(1, 1, 1), num_classes=3),
}


def _model(case, dtype="float64", **kw):
  kw = {**CASES[case], **kw}
  return build(tiny_config(kw.pop("parametrisation"), dtype=dtype, **kw))


def _uncond_context(ctx):
  return None if ctx is None else jnp.zeros_like(ctx) + 0.25


# --------------------------------------------------------------------------------------------- 20


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_equals_uncached(case, x64):
  m, v, x, labels, ctx = _model(case)
  uc = _uncond_context(ctx)
  z = jax.random.normal(jax.random.key(1), x.shape, x.dtype)
  for w in (0.0, 1.5):
    g = Guidance.for_model(m.cfg.parametrisation, w, attn_temp=1.3)
    cached, _ = reverse_fn(m, guidance=g)(v, z, labels, ctx, uc)
    uncached = jax.jit(functools.partial(flows.reverse_uncached, m, guidance=g))(v, z, labels, ctx,
                                                                                 uc)
    np.testing.assert_allclose(cached, uncached, atol=1e-12, rtol=0)


def test_cached_equals_uncached_float32():
  m, v, x, labels, _ = _model("starflow2_shallow", dtype="float32")
  z = jax.random.normal(jax.random.key(1), x.shape)
  cached, _ = reverse_fn(m, guidance=2.0)(v, z, labels)
  uncached = jax.jit(functools.partial(flows.reverse_uncached, m, guidance=2.0))(v, z, labels)
  assert_close_to_scale(cached, uncached)


# --------------------------------------------------------------------------------------------- 21


def test_jacobi_equals_sequential_and_prefix_exactness():
  cfg = tiny_config("starflow", layers=(1, 2), num_classes=3, image=(4, 8))  # 8 tokens
  m, v, x, labels, _ = build(cfg)
  z = jax.random.normal(jax.random.key(2), x.shape)
  seq, _ = reverse_fn(m, guidance=1.0)(v, z, labels)
  jac, info = reverse_fn(m, guidance=1.0, jacobi=Jacobi(block_size=4, threshold=-1.0, max_iter=3))(
      v, z, labels)
  assert_close_to_scale(jac, seq)  # (a)
  np.testing.assert_array_equal(info["jacobi_iters"], 3)
  # (b) after j iterations the first j+1 tokens of the (first) chunk are exact: one-block model
  one = tiny_config("starflow", layers=(2,), num_classes=3, image=(4, 8))
  m1, v1, _, _, _ = build(one)
  seq1, _ = reverse_fn(m1)(v1, z, labels)
  for j in (1, 2):
    xj, _ = reverse_fn(m1, jacobi=Jacobi(block_size=4, threshold=-1.0, max_iter=j))(v1, z, labels)
    assert_close_to_scale(xj[:, :j + 1], seq1[:, :j + 1])
    assert np.max(np.abs(np.asarray(xj[:, j + 1] - seq1[:, j + 1]))) > 1e-4


def test_jacobi_stale_cache_differs_from_exact_and_both_converge():
  """16 tokens in chunks of 8 on a weakly coupled model: Jacobi stops on the threshold before a chunk
  is exact (bs - 1 iterations make it exact), so the stale cache (built from the previous iterate)
  must change the next chunk, while both variants stay within O(threshold) of sequential sampling."""
  bs, eta, max_iter = 8, 1e-3, 32
  cfg = tiny_config("starflow", layers=(1, 2), image=(8, 8))
  m, v, x, _, _ = build(cfg, head_scale=0.1)
  z = jax.random.normal(jax.random.key(3), x.shape)
  seq, _ = reverse_fn(m)(v, z)
  rel_mse = lambda a, b: float(jnp.mean((a - b) ** 2) / jnp.mean(b ** 2))
  runs = {exact: reverse_fn(m, jacobi=Jacobi(block_size=bs, threshold=eta, max_iter=max_iter,
                                             exact_cache=exact))(v, z) for exact in (True, False)}
  for exact, (xj, info) in runs.items():
    iters = np.asarray(info["jacobi_iters"])  # [blocks, chunks]
    assert iters.shape == (cfg.num_blocks, cfg.num_tokens // bs)
    assert np.all(iters[:, :-1] <= bs - 2), iters  # every reused cache comes from an inexact iterate
    assert rel_mse(xj, seq) <= 10 * eta, (exact, rel_mse(xj, seq))
  (exact_x, _), (stale_x, _) = runs[True], runs[False]
  # float32 runs of the same maths agree to ~1e-14 in relative MSE here; the stale cache moves ~3e-7
  assert rel_mse(stale_x, exact_x) > 1e-10, rel_mse(stale_x, exact_x)


def test_jacobi_iterations_identical_across_shardings():
  cfg = tiny_config("starflow", layers=(1, 2), num_classes=3, image=(4, 8))
  m, v, _, _, _ = build(cfg, batch=8)
  z = jax.random.normal(jax.random.key(4), (8, cfg.num_tokens, cfg.token_dim))
  labels = jnp.arange(8) % 3
  sampler = reverse_fn(m, guidance=1.0, jacobi=Jacobi(block_size=4, threshold=1e-3, max_iter=8))
  x1, info1 = sampler(v, z, labels)
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  zs, ls = jax.device_put(z, row), jax.device_put(labels, row)
  x8, info8 = sampler(v, zs, ls)
  assert len(zs.sharding.device_set) == 8
  np.testing.assert_array_equal(info8["jacobi_iters"], info1["jacobi_iters"])
  assert_close_to_scale(x8, x1)


# ------------------------------------------------------------- per-block strategies (GS-Jacobi)


@pytest.fixture(scope="module")
def three_blocks():
  """A 3-block TarFlow (16 tokens) on which plain Jacobi needs ~8 iterations per block."""
  cfg = tiny_config("tarflow", layers=(1, 1, 1), num_classes=3, image=(8, 8), dtype="float64")
  return build(cfg, head_scale=0.05)


def test_per_block_strategies_equal_sequential_as_thresholds_go_to_zero(three_blocks, x64):
  """Segments of 4 (GS-Jacobi) from the first-token affine guess, a sequential block, and plain Jacobi
  over all 16 tokens from the noise; the relative-MSE threshold eta leaves errors ~ sqrt(eta)."""
  m, v, x, labels, _ = three_blocks
  z = jax.random.normal(jax.random.key(5), x.shape, x.dtype)
  seq, _ = reverse_fn(m, guidance=1.0)(v, z, labels)
  errors = []
  for eta in (1e-6, 1e-26):
    mixed = (Jacobi(block_size=4, threshold=eta, max_iter=16, init="first_affine"), None,
             Jacobi(block_size=16, threshold=eta, max_iter=16, init="noise"))
    xm, info = reverse_fn(m, guidance=1.0, jacobi=mixed)(v, z, labels)
    assert info["block_iters"][1] is None and info["block_iters"][0].shape == (4,)
    assert "jacobi_iters" not in info
    errors.append(float(jnp.max(jnp.abs(xm - seq))))
  assert 1e-10 < errors[0] < 1e-2 and errors[1] < 1e-11, errors


def test_initial_guesses_and_the_ranking_of_blocks(three_blocks, x64):
  m, v, x, labels, _ = three_blocks
  z = jax.random.normal(jax.random.key(6), x.shape, x.dtype)
  jac = Jacobi(16, threshold=1e-12, max_iter=16)
  ranks = np.asarray(jax.jit(functools.partial(flows.rank_blocks, m, jacobi=jac))(v, z, labels))
  assert ranks.shape == (3,) and np.all((ranks > 1 / 16) & (ranks <= 1)), ranks
  _, info = reverse_fn(m, jacobi=dataclasses.replace(jac, init="zeros"))(v, z, labels)
  assert not np.allclose(np.asarray(info["jacobi_iters"])[:, 0] / 16, ranks)  # the guess matters
  cut = float(np.sort(ranks)[1])
  chosen = flows.choose_strategies(ranks, jac, sequential_above=cut)
  assert [s is None for s in chosen] == [bool(r > cut) for r in ranks] and chosen.count(None) == 1
  with pytest.raises(ValueError, match="expected 3 entries"):
    flows.reverse(m, v, z, labels, jacobi=(jac, None))
  with pytest.raises(ValueError, match="jacobi.init must be one of"):
    Jacobi(init="previous")


# ----------------------------------------------------------------------------------------- 22, 23


def test_gaussian_rule_identities(x64):
  rng = np.random.default_rng(0)
  mc, mu = rng.normal(size=(2, 500))
  sc, su = np.exp(rng.normal(size=(2, 500)))
  aff = lambda m_, s_: flows.Affine(jnp.asarray(m_), jnp.asarray(s_), jnp.log(jnp.asarray(s_)))
  c, u = aff(mc, sc), aff(mu, su)
  g0 = flows.gaussian_rule(c, u, 0.0)
  np.testing.assert_allclose(g0.shift, mc, atol=1e-12)
  np.testing.assert_allclose(g0.scale, sc, atol=1e-12)
  for w in (0.5, 3.6):
    g = flows.gaussian_rule(c, u, w)
    lo = sc <= su
    inv_var = (1 + w) / sc ** 2 - w / su ** 2
    np.testing.assert_allclose(1 / np64(g.scale)[lo] ** 2, inv_var[lo], rtol=1e-12)
    np.testing.assert_allclose(g.shift[lo], (((1 + w) * mc / sc ** 2 - w * mu / su ** 2) / inv_var)[lo],
                               rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g.scale[~lo], sc[~lo], rtol=1e-12)
    np.testing.assert_allclose(g.shift[~lo], ((1 + w) * mc - w * mu)[~lo], rtol=1e-12, atol=1e-12)
    assert np.all((np64(g.scale) > 0) & (np64(g.scale) <= sc * (1 + 1e-12)))
    np.testing.assert_allclose(g.log_scale, np.log(np64(g.scale)), atol=1e-12)


def test_linear_rule_and_annealing(x64):
  rng = np.random.default_rng(1)
  a = [jnp.asarray(rng.normal(size=(1, 4, 2))) for _ in range(4)]
  c = flows.Affine(a[0], jnp.exp(a[1]), a[1])
  u = flows.Affine(a[2], jnp.exp(a[3]), a[3])
  only_a = flows.linear_rule(c, u, 2.0, "a")
  np.testing.assert_array_equal(only_a.shift, c.shift)
  np.testing.assert_allclose(only_a.log_scale, a[1] + 2.0 * (a[1] - a[3]), atol=1e-12)
  only_b = flows.linear_rule(c, u, 2.0, "b")
  np.testing.assert_array_equal(only_b.scale, c.scale)
  np.testing.assert_allclose(only_b.shift, a[0] + 2.0 * (a[0] - a[2]), atol=1e-12)
  n = jnp.arange(16)
  tar = Guidance(weight=2.0, rule="linear", anneal=True).weights(n, 16, "tarflow")
  np.testing.assert_allclose(tar[1:], 2.0 * (np.arange(15) + 1) / 15, atol=1e-12)  # g_i, i = n - 1
  star = Guidance(weight=2.0, anneal=True).weights(n, 16, "starflow")
  np.testing.assert_allclose(star, 2.0 * (np.arange(16) + 1) / 16, atol=1e-12)
  np.testing.assert_array_equal(Guidance(weight=2.0).weights(n, 16, "starflow"), 2.0)


def _combine_ref(rule, c, u, w, guide_what="ab"):
  """Independent float64 numpy guidance rules (STARFLOW2.md 7.2)."""
  (mc, sc), (mu, su) = [(np64(t.shift), np64(t.scale)) for t in (c, u)]
  if rule == "gaussian":
    s = np.minimum(sc / su, 1.0) ** 2
    d = 1 + w - w * s
    return ((1 + w) * mc - w * s * mu) / d, sc / np.sqrt(d)
  la, lu = np.log(sc), np.log(su)
  shift = mc + w * (mc - mu) if "b" in guide_what else mc
  scale = np.exp(la + w * (la - lu)) if "a" in guide_what else sc
  return shift, scale


@pytest.mark.parametrize("case,rule,anneal,what", [
    ("tarflow_cond", "linear", True, "ab"), ("tarflow_cond", "linear", False, "a"),
    ("starflow2_shallow", "gaussian", True, "ab"), ("starflow_prefix", "gaussian", False, "ab")])
def test_guided_sample_is_consistent_with_teacher_forcing(case, rule, anneal, what, x64):
  """Walk the guided sample forward through every block: the uncond branch must have seen the same
  guided prefix (mean class embedding / null context, attention temperature on it alone), shallow
  blocks are unguided, and (x - mu_eff) / sigma_eff recovers the noise exactly."""
  m, v, x, labels, ctx = _model(case)
  cfg = m.cfg
  uc = _uncond_context(ctx)
  g = Guidance(weight=1.7, rule=rule, anneal=anneal, guide_what=what, attn_temp=1.4)
  z = jax.random.normal(jax.random.key(7), x.shape, x.dtype)
  xs, _ = reverse_fn(m, guidance=g)(v, z, labels, ctx, uc)
  u = xs
  b = x.shape[0]
  for k in range(cfg.num_blocks):
    perm = cfg.permutations[k]
    up = np64(flows.permute(u, perm))
    ck = ctx if cfg.has_context(k) else None
    fwd = lambda lab, c, qs: m.apply(v, k, u, lab, c, qs, method=flows.FlowModel.block_forward)[2]
    th_c = fwd(labels if cfg.is_conditional(k) else None, ck, None)
    if cfg.is_conditional(k):
      null = None if labels is None else -jnp.ones_like(labels)
      th_u = fwd(null, None if ck is None else uc, jnp.full((b,), 1 / 1.4))
      w = np.asarray(g.weights(jnp.arange(cfg.num_tokens), cfg.num_tokens, cfg.parametrisation))
      shift, scale = _combine_ref(rule, th_c, th_u, w[None, :, None], what)
    else:
      shift, scale = np64(th_c.shift), np64(th_c.scale)
    u = jnp.asarray(flows.permute(jnp.asarray((up - shift) / scale), perm))
  np.testing.assert_allclose(u, z, atol=1e-10)


def _always_guided(guidance: Guidance):
  """A copy of `guidance` that takes the batched [cond; uncond] path even at w = 0 (the sampler skips
  it when `Guidance.active` is False, the documented meaning of w = 0), and the list of (cond, uncond)
  shapes of every combine the sampler traces with it."""
  calls = []

  class AlwaysGuided(Guidance):
    @property
    def active(self):
      return True

    def combine(self, cond, uncond, w):
      calls.append((cond.shift.shape, uncond.shift.shape))
      return super().combine(cond, uncond, w)

  return AlwaysGuided(**dataclasses.asdict(guidance)), calls


@pytest.mark.parametrize("case", ["tarflow_cond", "starflow_prefix"])  # linear + labels, gaussian + context
def test_zero_weight_is_unguided(case, x64):
  m, v, x, labels, ctx = _model(case)
  uc = _uncond_context(ctx)
  z = jax.random.normal(jax.random.key(1), x.shape, x.dtype)
  plain, _ = reverse_fn(m)(v, z, labels, ctx, uc)
  g0 = Guidance.for_model(m.cfg.parametrisation, 0.0, attn_temp=3.0)
  assert not g0.active  # w = 0 short-circuits to the unguided sampler, bit for bit
  np.testing.assert_array_equal(reverse_fn(m, guidance=g0)(v, z, labels, ctx, uc)[0], plain)
  # The guided maths at w = 0: the cond half of the batched pass (next to an uncond half with its own
  # labels, context and attention temperature) combined with weight 0 is the unguided sample.
  forced, calls = _always_guided(g0)
  guided, _ = reverse_fn(m, guidance=forced)(v, z, labels, ctx, uc)
  b = x.shape[0]
  assert calls and all(c == u and c[0] == b for c, u in calls), calls
  np.testing.assert_allclose(guided, plain, atol=1e-12, rtol=0)
  # ... and the uncond half is a different distribution: the same path at w = 1 moves the sample.
  forced1, _ = _always_guided(dataclasses.replace(g0, weight=1.0))
  assert np.max(np.abs(np64(reverse_fn(m, guidance=forced1)(v, z, labels, ctx, uc)[0] - plain))) > 1e-3


# --------------------------------------------------------------------------------------- 24, 26


def test_determinism_and_zero_temperature():
  cfg = tiny_config("starflow", layers=(1, 1), num_classes=3)
  m, v, _, _, _ = build(cfg)
  key = jax.random.key(11)
  sample = jax.jit(lambda v, k, l: flows.sample(m, v, k, l, guidance=1.0), static_argnums=())
  labels4 = jnp.array([0, 1, 2, 0])
  a = sample(v, key, labels4)
  np.testing.assert_array_equal(a, sample(v, key, labels4))  # same process
  recompiled = jax.jit(lambda v, k, l: flows.sample(m, v, k, l, guidance=1.0))
  np.testing.assert_array_equal(a, recompiled(v, key, labels4))  # re-compilation
  np.testing.assert_array_equal(a[:2], sample(v, key, labels4[:2]))  # batch size
  cold = jax.jit(lambda v, k: flows.sample(m, v, k, labels4, temperature=0.0))
  np.testing.assert_array_equal(cold(v, key), cold(v, jax.random.key(12)))  # tau = 0
  z0 = jnp.zeros((4, cfg.num_tokens, cfg.token_dim))
  np.testing.assert_array_equal(cold(v, key), reverse_fn(m)(v, z0, labels4)[0])  # mu chain


# --------------------------------------------------------------------------------------------- 25


@pytest.mark.parametrize("par", ["tarflow", "starflow"])
def test_tweedie_closed_form(par, x64):
  cfg = tiny_config(par, layers=(1,), dtype="float64", noise_std=0.3)
  m, v, x, _, _ = build(cfg, batch=3)
  d = cfg.token_dim
  rng = np.random.default_rng(0)
  a0, b0 = rng.normal(size=d) * 0.5, rng.normal(size=d)
  head = v["params"]["blocks_0"]["proj_out"]
  head["kernel"] = jnp.zeros_like(head["kernel"])
  head["bias"] = jnp.asarray(np.concatenate([a0, b0]))
  if par == "tarflow":
    m0, s = b0, np.exp(a0)
  else:
    m0, s = 4 * np.tanh(b0 / 4), np.log1p(np.exp(4 * np.tanh(a0 / 4) + np.log(np.e - 1)))
  sig = 0.3
  xn = np64(x)
  expected = xn - sig ** 2 * (xn - m0) / s ** 2
  if par == "tarflow":  # token 0 passes through: N(0, 1)
    expected[:, 0] = xn[:, 0] - sig ** 2 * xn[:, 0]
  out = jax.jit(lambda v, x: flows.denoise(m, v, x))(v, x)
  np.testing.assert_allclose(out, expected, atol=1e-10)
  # TarFlow's form: lr = B*H*W*C*sigma^2 on the gradient of the batch-mean loss
  grad = jax.grad(lambda x: flows.loss(m.apply(v, x)))(x)
  lr = x.shape[0] * cfg.num_tokens * d * sig ** 2
  np.testing.assert_allclose(x - lr * grad, expected, atol=1e-10)


def test_reverse_errors():
  cfg = tiny_config("starflow", layers=(1,), context_dim=8)
  m, v, x, _, ctx = build(cfg)
  with pytest.raises(ValueError, match="uncond_context"):
    flows.reverse(m, v, x, None, ctx, guidance=1.0)
  with pytest.raises(ValueError, match="must divide the number of tokens 6"):
    flows.reverse(m, v, x, None, ctx, jacobi=Jacobi(block_size=4))
  with pytest.raises(ValueError, match="block_size must be >= 2"):
    Jacobi(block_size=1)
