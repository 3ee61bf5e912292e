"""nn/: KV cache (prefill + decode == full forward), RoPE tables and layouts, norms."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from starflow2_jax import nn as snn
from starflow2_jax.nn import rope


def _cfg(**kw):
  base = dict(width=32, num_layers=2, num_heads=2, head_dim=16)
  base.update(kw)
  return snn.TransformerConfig(**base)


@pytest.mark.parametrize("flavour", ["tarflow", "qwen"])
def test_cached_equals_full_forward(flavour):
  if flavour == "tarflow":
    cfg, spec = _cfg(), None
  else:
    cfg = _cfg(num_heads=4, num_kv_heads=2, mlp="swiglu", norm="rmsnorm", norm_eps=1e-6,
               fused_qkv=False, out_bias=False, mlp_bias=False, rope_layout="half", mlp_hidden=48)
    spec = rope.mrope(16, (2, 3, 3), 1e6)
  model = snn.Transformer(cfg)
  b, t = 2, 9
  x = jax.random.normal(jax.random.key(0), (b, t, 32))
  pos = jnp.broadcast_to(jnp.arange(t)[None, :, None] * jnp.array([1, 2, 3]), (b, t, 3))
  ang = None if spec is None else spec.angles(pos)
  params = jax.jit(model.init)(jax.random.key(1), x, angles=ang)
  apply = jax.jit(model.apply)
  full, _, _ = apply(params, x, angles=ang)
  cache = cfg.init_cache(b, 16)
  outs = []
  for lo, hi in [(0, 4), (4, 5), (5, 6), (6, 9)]:
    a = None if ang is None else ang[:, lo:hi]
    o, cache, _ = apply(params, x[:, lo:hi], angles=a, cache=cache)
    outs.append(o)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-5)
  assert int(cache.index) == t


def test_padded_keys_are_masked():
  cfg = _cfg(num_layers=1)
  model = snn.Transformer(cfg)
  x = jax.random.normal(jax.random.key(0), (1, 5, 32))
  params = model.init(jax.random.key(1), x)
  valid = jnp.array([[False, False, True, True, True]])
  out, _, _ = model.apply(params, x, valid=valid)
  x2 = x.at[:, :2].set(100.0)  # pad content must not matter to valid queries
  out2, _, _ = model.apply(params, x2, valid=valid)
  np.testing.assert_allclose(out[:, 2:], out2[:, 2:], atol=1e-6)


def test_rope_layouts_and_mrope_reduces_to_1d(x64):
  spec3 = rope.mrope(16, (2, 3, 3), 1e4)
  spec1 = rope.rope_1d(16, 1e4)
  p = jnp.arange(7, dtype=jnp.float64)[None]
  a3 = spec3.angles(jnp.stack([p, p, p], -1))
  a1 = spec1.angles(p)
  np.testing.assert_allclose(a3, a1, rtol=0, atol=1e-12)
  x = jax.random.normal(jax.random.key(0), (1, 7, 2, 16), jnp.float64)
  # half layout equals interleaved layout after the channel permutation that maps pairs onto pairs
  perm = np.stack([np.arange(8), np.arange(8) + 8], -1).reshape(-1)
  yh = rope.apply_rope(x, a1, "half")
  yi = rope.apply_rope(x[..., perm], a1, "interleaved")
  np.testing.assert_allclose(yh[..., perm], yi, atol=1e-12)
  # rotations preserve norms
  np.testing.assert_allclose(jnp.linalg.norm(yh, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-12)


def test_starflow_grid_positions():
  pos = rope.starflow_grid_positions(3, 5, pt=4)
  s = 4 / np.sqrt(15)
  for r in range(3):
    for c in range(5):
      np.testing.assert_array_equal(pos[r * 5 + c], [r * s, c * s])


def test_rmsnorm_conventions(x64):
  x = jax.random.normal(jax.random.key(0), (3, 8), jnp.float64)
  ref = x / np.sqrt(np.mean(np.asarray(x) ** 2, -1, keepdims=True) + 1e-6)
  for offset in (0.0, 1.0):
    m = snn.RMSNorm(eps=1e-6, scale_offset=offset, dtype=jnp.float64, param_dtype=jnp.float64)
    p = m.init(jax.random.key(0), x)
    np.testing.assert_allclose(m.apply(p, x), ref, atol=1e-12)  # both inits are the identity scale


def test_scanned_unrolled_and_remat_policies_agree(x64):
  """One stacked parameter tree; scanned, unrolled and every remat policy give the same output and
  the same gradients (remat changes what is stored, never the maths). float64: agreement to 1e-10."""
  f64 = dict(num_layers=3, dtype=jnp.float64, param_dtype=jnp.float64)
  base = _cfg(**f64)
  x = jax.random.normal(jax.random.key(0), (2, 5, 32), jnp.float64)
  boxed = snn.Transformer(base).init(jax.random.key(1), x)
  kernel = boxed["params"]["stack"]["attn"]["qkv"]["kernel"]
  assert kernel.value.shape == (3, 32, 96) and kernel.names == ("layers", "embed", "qkv")
  params = nn.unbox(boxed)

  def loss(p, cfg):
    return jnp.sum(jnp.square(snn.Transformer(cfg).apply(p, x)[0]))

  want_val, want_grad = jax.jit(jax.value_and_grad(lambda p: loss(p, base)))(params)
  for kw in [dict(scan_layers=False), dict(remat="full"), dict(remat="dots_saveable"),
             dict(remat="full", scan_layers=False)]:
    val, grad = jax.jit(jax.value_and_grad(lambda p, kw=kw: loss(p, _cfg(**f64, **kw))))(params)
    np.testing.assert_allclose(val, want_val, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
  with pytest.raises(ValueError, match=r"remat must be one of \('none', 'dots_saveable', 'full'\)"):
    _cfg(remat=True)


def test_residual_adds_taps_and_hidden_against_a_layer_loop():
  """residual_adds before layer j, taps after layer j and collect_hidden equal a Python loop over the
  stacked layers' slices."""
  cfg = _cfg(num_layers=3)
  model = snn.Transformer(cfg)
  x = jax.random.normal(jax.random.key(0), (2, 5, 32))
  adds = {1: jax.random.normal(jax.random.key(2), x.shape), 2: jax.random.normal(jax.random.key(3), x.shape)}
  params = nn.unbox(model.init(jax.random.key(1), x))
  h_ref, hidden_ref = x, {}
  mask = snn.causal_mask(5)
  for i in range(cfg.num_layers):
    h_ref = h_ref + adds.get(i, 0.0)
    layer = {"params": jax.tree.map(lambda a, i=i: a[i], params["params"]["stack"])}
    h_ref, _ = snn.attention.TransformerLayer(cfg).apply(layer, h_ref, mask=mask)
    hidden_ref[i + 1] = h_ref
  h, _, taps = model.apply(params, x, residual_adds=adds, taps=(1, 3))
  np.testing.assert_allclose(h, h_ref, atol=1e-5)
  assert sorted(taps) == [1, 3]
  for j in (1, 3):
    np.testing.assert_allclose(taps[j], hidden_ref[j], atol=1e-5)
  _, _, hidden = model.apply(params, x, residual_adds=adds, collect_hidden=True)
  for j in range(1, 4):
    np.testing.assert_allclose(hidden[j], hidden_ref[j], atol=1e-5)
  with pytest.raises(ValueError, match=r"layer 4 \(1-based\).*expected 1..3"):
    model.apply(params, x, taps=(4,))


def test_cache_logical_axes_and_shardings():
  from starflow2_jax import parallel
  mesh = jax.sharding.AbstractMesh((2, 2, 2), parallel.MESH_AXES)
  cache = jax.eval_shape(lambda: _cfg(num_kv_heads=2).init_cache(4, 16))
  sh = cache.shardings(mesh, parallel.DEFAULT_LOGICAL_RULES)
  assert sh.k.spec == P(None, ("data", "fsdp"), None, "tensor", None) == sh.v.spec
  assert sh.valid.spec == P(("data", "fsdp"), None) and sh.index.spec == P()
  odd = jax.eval_shape(lambda: _cfg(num_kv_heads=2).init_cache(3, 16))  # 3 rows: batch replicated
  assert odd.shardings(mesh, parallel.DEFAULT_LOGICAL_RULES).k.spec == P(None, None, None, "tensor", None)
