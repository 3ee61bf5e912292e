"""nn/attention_ops.py: every implementation usable on CPU against plain float64 softmax maths.

Values and gradients (q, k, v) for causal, left-padded (rows whose keys are all masked), cache-slot,
grouped-query and per-row-scale attention, bfloat16 inputs, batch-chunked cpu kernels, and the
transformations the cpu kernel claims (jit, vmap, grad of grad, jacfwd).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starflow2_jax import nn as snn
from starflow2_jax.errors import UserError
from starflow2_jax.nn import attention_ops

CPU_IMPLS = ("xla", "cpu", None)


def reference(q, k, v, mask, scale):
  """Plain softmax attention in float64 (jax, x64): q [B, T, H, D], k/v [B, S, Hkv, D], mask
  broadcastable to [B, H, T, S], scale float or [B]. Fully masked rows attend uniformly."""
  q, k, v = (jnp.asarray(a, jnp.float64) for a in (q, k, v))
  b, t, h, _ = q.shape
  s, hkv = k.shape[1], k.shape[2]
  k, v = jnp.repeat(k, h // hkv, axis=2), jnp.repeat(v, h // hkv, axis=2)
  scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float64), (b,))
  logits = jnp.einsum("bthd,bshd->bhts", q, k) * scale[:, None, None, None]
  mask = jnp.broadcast_to(jnp.ones((), bool) if mask is None else mask, (b, h, t, s))
  live = jnp.any(mask, axis=-1, keepdims=True)
  safe = mask | ~live  # a fully masked row takes all keys here, then is replaced by uniform weights
  p = jax.nn.softmax(jnp.where(safe, logits, -jnp.inf), axis=-1)
  p = jnp.where(live, p, 1.0 / s)
  return jnp.einsum("bhts,bshd->bthd", p, v)


def inputs(b=2, t=8, s=None, h=4, hkv=None, d=16, dtype=jnp.float32, seed=0):
  s = s or t
  hkv = hkv or h
  kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (b, t, h, d), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (b, s, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (b, s, hkv, d), jnp.float32).astype(dtype)
  cot = jax.random.normal(kc, (b, t, h, d), jnp.float32)
  return q, k, v, cot


def causal(t):
  return jnp.tril(jnp.ones((t, t), bool))[None, None]


def left_padded(t, pads):
  """Causal mask with the first pads[b] keys of row b invalid: queries < pads[b] see no key."""
  valid = jnp.arange(t)[None, :] >= jnp.asarray(pads)[:, None]
  return causal(t) & valid[:, None, None, :]


def cache_slots(t, slots, index, valid):
  """The cache mask of nn.attention.causal_mask: T queries at slots index.. over `slots` slots."""
  q_pos = index + jnp.arange(t)
  m = (jnp.arange(slots)[None, :] <= q_pos[:, None])[None, None]
  return m & valid[:, None, None, :]


MASKS = {
    "causal": lambda b, t, s: causal(t),
    "left_padded": lambda b, t, s: left_padded(t, [3, 0][:b]),
    "cache_slots": lambda b, t, s: cache_slots(
        t, s, 4, jnp.arange(s)[None, :] >= jnp.array([[1], [0]])[:b]),
    "none": lambda b, t, s: None,
    "per_head": lambda b, t, s: jax.random.bernoulli(jax.random.key(9), 0.6, (b, 4, t, s)),
}


def grads(impl, q, k, v, mask, scale, cot):
  def f(q, k, v):
    if impl == "reference":
      return reference(q, k, v, mask, scale)
    return attention_ops.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                               implementation=impl)
  out, vjp = jax.vjp(f, q, k, v)
  return (out, *vjp(cot.astype(out.dtype)))


def check_against_reference(impl, q, k, v, mask, scale, cot, tol):
  got = jax.jit(lambda q, k, v: grads(impl, q, k, v, mask, scale, cot))(q, k, v)
  with jax.enable_x64(True):
    want = grads("reference", *(np.asarray(a, np.float64) for a in (q, k, v)), mask,
                 scale if not hasattr(scale, "shape") else np.asarray(scale, np.float64),
                 np.asarray(cot, np.float64), )
    want = [np.asarray(w) for w in want]
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(np.asarray(g, np.float64), w, atol=tol, rtol=tol, err_msg=name)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("mask_kind", sorted(MASKS))
def test_values_and_gradients_match_float64(impl, mask_kind):
  t, s = (3, 12) if mask_kind == "cache_slots" else (8, 8)
  q, k, v, cot = inputs(t=t, s=s)
  check_against_reference(impl, q, k, v, MASKS[mask_kind](2, t, s), 0.25, cot, 2e-5)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("hkv", [1, 2])
def test_grouped_query_attention(impl, hkv):
  q, k, v, cot = inputs(h=4, hkv=hkv, t=6)
  for mask in (left_padded(6, [2, 0]), MASKS["per_head"](2, 6, 6)):
    check_against_reference(impl, q, k, v, mask, 0.3, cot, 2e-5)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_per_row_scales(impl):
  q, k, v, cot = inputs()
  scale = jnp.array([0.25, 0.6])
  check_against_reference(impl, q, k, v, causal(8), scale, cot, 2e-5)
  # the gradient with respect to the scales themselves, against the float64 maths
  f = lambda sc, impl=impl: jnp.sum(cot * attention_ops.dot_product_attention(  # noqa: E731
      q, k, v, mask=causal(8), scale=sc, implementation=impl))
  with jax.enable_x64(True):
    want = jax.grad(lambda sc: jnp.sum(np.asarray(cot, np.float64) * reference(
        np.asarray(q, np.float64), np.asarray(k, np.float64), np.asarray(v, np.float64), causal(8),
        sc)))(np.asarray(scale, np.float64))
  np.testing.assert_allclose(jax.grad(f)(scale), want, rtol=1e-4)
  # a traced scalar scale equals the float
  np.testing.assert_allclose(jax.jit(lambda sc: attention_ops.dot_product_attention(
      q, k, v, mask=causal(8), scale=sc, implementation=impl))(jnp.float32(0.3)),
      attention_ops.dot_product_attention(q, k, v, mask=causal(8), scale=0.3, implementation=impl),
      atol=1e-6)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_bfloat16_inputs(impl):
  q, k, v, cot = inputs(dtype=jnp.bfloat16)
  out = attention_ops.dot_product_attention(q, k, v, mask=left_padded(8, [3, 0]), scale=0.25,
                                            implementation=impl)
  assert out.dtype == jnp.bfloat16
  check_against_reference(impl, q, k, v, left_padded(8, [3, 0]), 0.25, cot, 3e-2)


def test_fully_masked_rows_are_uniform_without_gradient_like_jax():
  q, k, v, cot = inputs()
  mask = left_padded(8, [3, 0])
  outs = {impl: grads(impl, q, k, v, mask, 0.25, cot) for impl in ("xla", "cpu")}
  for a in outs["cpu"]:
    assert np.all(np.isfinite(a))
  # rows 0..2 of batch row 0 see no key: the mean of v over all keys, no gradient to their queries
  np.testing.assert_allclose(outs["cpu"][0][0, :3], jnp.broadcast_to(
      jnp.mean(v[0], axis=0), (3, 4, 16)), atol=1e-6)
  np.testing.assert_array_equal(outs["cpu"][1][0, :3], 0.0)
  for a, b in zip(outs["cpu"], outs["xla"]):
    np.testing.assert_allclose(a, b, atol=2e-6)


@pytest.mark.parametrize("mask_kind", ["causal", "left_padded", "per_head"])
def test_cpu_batch_chunks_match_one_block(mask_kind, monkeypatch):
  q, k, v, cot = inputs(b=4, t=8)
  mask = MASKS[mask_kind](4, 8, 8)
  if mask_kind == "left_padded":
    mask = left_padded(8, [3, 0, 5, 1])
  one = grads("cpu", q, k, v, mask, 0.25, cot)
  row_bytes = 4 * 8 * 8 * 4  # heads x T x S float32 logits of one batch row
  monkeypatch.setattr(attention_ops, "CPU_CHUNK_BYTES", 2 * row_bytes)  # chunks of 2 rows
  assert attention_ops._batch_chunk(4, row_bytes) == 2
  chunked = jax.jit(lambda q, k, v: grads("cpu", q, k, v, mask, 0.25, cot))(q, k, v)
  assert "while" in jax.jit(lambda q: attention_ops.dot_product_attention(
      q, k, v, mask=mask, implementation="cpu")).lower(q).as_text()  # the chunk loop ran
  for a, b in zip(chunked, one):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_cpu_kernel_transformations():
  q, k, v, _ = inputs(b=2, t=5, h=2, d=4)
  mask = left_padded(5, [2, 0])
  f = lambda q, k, v: attention_ops.dot_product_attention(  # noqa: E731
      q, k, v, mask=mask, scale=0.5, implementation="cpu")
  ref = lambda q, k, v: attention_ops.dot_product_attention(  # noqa: E731
      q, k, v, mask=mask, scale=0.5, implementation="xla")
  # vmap over a leading axis equals the batched call
  qs = jnp.stack([q, 2 * q])
  np.testing.assert_allclose(jax.vmap(lambda q: f(q, k, v))(qs), jnp.stack([f(q, k, v),
                                                                             f(2 * q, k, v)]),
                             atol=1e-6)
  # grad of grad and forward mode against the XLA path
  hess = lambda fn: jax.grad(lambda q: jnp.sum(jax.grad(  # noqa: E731
      lambda q: jnp.sum(jnp.sin(fn(q, k, v))))(q) ** 2))(q)
  np.testing.assert_allclose(jax.jit(lambda q: hess(f))(q), hess(ref), atol=1e-5)
  jf = jax.jacfwd(lambda k: f(q, k, v)[1])(k)
  jr = jax.jacrev(lambda k: ref(q, k, v)[1])(k)
  np.testing.assert_allclose(jf, jr, atol=1e-6)
  assert float(jnp.max(jnp.abs(jf))) > 1e-3  # the Jacobian is not trivially zero


def test_float64_inputs_are_exact(x64):
  q, k, v, cot = (np.asarray(a, np.float64) for a in inputs(hkv=2))
  mask = left_padded(8, [3, 0])
  got = grads("cpu", q, k, v, mask, 0.25, cot)
  want = grads("reference", q, k, v, mask, 0.25, cot)
  assert got[0].dtype == jnp.float64
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-12)


def test_pallas_tpu_kernel_in_interpret_mode():
  q, k, v, cot = inputs(b=1, t=128, h=2, hkv=1, d=8)  # key blocks are multiples of 128
  mask = left_padded(128, [3])
  got = grads("pallas_tpu_interpret", q, k, v, mask, 0.3, cot)
  ref = grads("cpu", q, k, v, mask, 0.3, cot)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
    np.testing.assert_allclose(a, b, atol=2e-5, err_msg=name)


def test_auto_picks_the_cpu_kernel_here():
  q = jnp.zeros((1, 2, 2, 8))
  assert attention_ops.resolve_implementation(None, q) == "cpu"
  assert attention_ops.resolve_implementation("auto", q) == "cpu"
  assert attention_ops.cudnn_supports(q.astype(jnp.bfloat16))
  assert not attention_ops.cudnn_supports(q)  # float32: cuDNN flash attention takes 16-bit inputs


def test_user_errors():
  q, k, v, _ = inputs()
  call = lambda **kw: attention_ops.dot_product_attention(q, k, v, **kw)  # noqa: E731
  with pytest.raises(UserError, match="attention_impl='flash'"):
    call(implementation="flash")
  with pytest.raises(UserError, match="TPU only.*pallas_tpu_interpret"):
    call(implementation="pallas_tpu")
  with pytest.raises(UserError, match="key length .8. must be a multiple of 128"):
    call(implementation="pallas_tpu_interpret")
  with pytest.raises(UserError, match="GPU only"):
    call(implementation="cudnn")
  with pytest.raises(UserError, match="does not broadcast"):
    call(mask=jnp.ones((3, 1, 8, 8), bool))
  with pytest.raises(UserError, match="must be bool"):
    call(mask=jnp.ones((8, 8)))
  with pytest.raises(UserError, match="scale must be a float, a scalar array or an array"):
    call(scale=jnp.ones((3,)))
  with pytest.raises(UserError, match="multiple of the 3 kv heads"):
    attention_ops.dot_product_attention(q, k[:, :, :3], v[:, :, :3])


def test_transformer_implementations_agree():
  """The whole trunk (causal + padding mask, and a prefill + decode with the KV cache)."""
  base = dict(width=32, num_layers=2, num_heads=4, head_dim=8, num_kv_heads=2, fused_qkv=False)
  x = jax.random.normal(jax.random.key(1), (2, 6, 32))
  valid = jnp.arange(6)[None, :] >= jnp.array([[2], [0]])
  outs = []
  for impl in ("xla", "cpu"):
    model = snn.Transformer(snn.TransformerConfig(**base, attention_impl=impl))
    params = model.init(jax.random.key(0), x, valid=valid)
    h, _, _ = model.apply(params, x, valid=valid)
    cache = model.cfg.init_cache(2, 8)
    h1, cache, _ = model.apply(params, x[:, :5], valid=valid[:, :5], cache=cache)
    h2, _, _ = model.apply(params, x[:, 5:], valid=valid[:, 5:], cache=cache)
    outs.append((h, jnp.concatenate([h1, h2], axis=1)))
  for a, b in zip(outs[0], outs[1]):
    np.testing.assert_allclose(a, b, atol=2e-5)
  # cached == uncached on the valid tokens (a pad token's keys are all masked: it averages all S
  # values, and S differs: 6 tokens uncached, 8 cache slots)
  np.testing.assert_allclose(outs[1][0][valid], outs[1][1][valid], atol=2e-5)
  assert not np.allclose(outs[1][0][~valid], outs[1][1][~valid], atol=1e-3)
