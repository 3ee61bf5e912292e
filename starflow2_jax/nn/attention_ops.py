"""Scaled dot-product attention as a pure function, with a kernel chosen per platform.

  dot_product_attention(q, k, v, *, mask=None, scale=None, implementation=None) -> [B, T, H, Dh]

q [B, T, H, Dh]; k, v [B, S, Hkv, Dh] with H a multiple of Hkv (grouped-query attention: query head h
reads kv head h // (H / Hkv), the convention of `jax.nn.dot_product_attention`); mask bool,
broadcastable to [B, H, T, S], True = the query may attend to the key; scale a Python float (default
Dh^-0.5), a scalar array, or an array [B] (a per-row logit scale, e.g. a guidance temperature).
Logits, the softmax maximum and its normaliser are float32 (float64 for float64 inputs) whatever the
input dtype. A row whose keys are all masked attends uniformly to all S keys (its output is the mean
of v) and no gradient flows through its logits: what the XLA path of `jax.nn.dot_product_attention`
gives.

Implementations (`TransformerConfig.attention_impl`):
  xla       `jax.nn.dot_product_attention(implementation="xla")`.
  cudnn     `jax.nn.dot_product_attention(implementation="cudnn")`: GPU, bfloat16/float16 inputs.
  cpu       heads-leading batched matmuls ([B, Hkv, G T, Dh] rows, the G query heads of a kv head
            stacked), the softmax normalisation applied after the value product, in batch chunks
            whose [c, Hkv, G T, S] logit block stays in cache (`CPU_CHUNK_BYTES`), recomputed in the
            backward pass (`jax.checkpoint` per chunk). Plain JAX, so every transformation (jit,
            vmap, grad of grad, jvp / jacfwd) applies.
  pallas_tpu  the Pallas TPU flash-attention kernel, the mask as an additive bias (TPU only);
  pallas_tpu_interpret  the same kernel run by the Pallas TPU interpreter (any platform; slow: tests).
  None / "auto": cpu on CPU; on GPU cudnn where `cudnn_supports` allows, else xla; xla on TPU.

The platform is the one the program is traced for: JAX's default backend, or inside
`target_platform(p)` the platform p (ahead-of-time compilation for a TPU slice on a CPU host,
`scale.abstract`: every kernel of every stream, whether its config names one or not).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp

from starflow2_jax.errors import UserError

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "cpu", "pallas_tpu", "pallas_tpu_interpret")
# Largest logit block [c, Hkv, G T, S] (float32 bytes) of one batch chunk of the cpu kernel: the
# chunk's logits, exponentials and mask stay in the L2/L3 caches (2 MiB L2 per core measured here).
CPU_CHUNK_BYTES = 4 << 20
# The logit of a masked key: jax.nn.dot_product_attention's value (a fully masked row is uniform).
MASKED_LOGIT_FRACTION = 0.7
PALLAS_BLOCK = 128  # the Pallas TPU kernel's block length (its key blocks must be multiples of it)
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128
CUDNN_HEAD_DIM_MULTIPLE = 8
_TARGET = contextvars.ContextVar("attention_target_platform", default=None)


@contextlib.contextmanager
def target_platform(name: str):
  """Choose and check kernels for the platform `name` ("cpu", "gpu", "tpu") instead of the default
  backend while a program for another backend is traced here (ahead-of-time compilation)."""
  token = _TARGET.set(name)
  try:
    yield
  finally:
    _TARGET.reset(token)


def platform() -> str:
  """The platform kernels are chosen for: `target_platform`'s, else JAX's default backend."""
  return _TARGET.get() or jax.default_backend()


def dot_product_attention(q, k, v, *, mask=None, scale=None, implementation: str | None = None):
  """Softmax(scale q k^T, masked) v per head. Shapes and implementations: see the module docstring."""
  _check_inputs(q, k, v, mask, scale)
  impl = resolve_implementation(implementation, q)
  if scale is None:
    scale = q.shape[-1] ** -0.5
  if not isinstance(scale, (int, float)):  # array scales (per row, or traced): fold into the queries
    q = q * jnp.asarray(scale, q.dtype).reshape(-1, 1, 1, 1)
    scale = 1.0
  if mask is not None:
    mask = jnp.reshape(mask, (1,) * (4 - mask.ndim) + mask.shape)
  if impl in ("xla", "cudnn"):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=float(scale), implementation=impl)
  if impl == "cpu":
    return _cpu_attention(q, k, v, mask, float(scale))
  return _pallas_attention(q, k, v, mask, float(scale), interpret=impl == "pallas_tpu_interpret")


def resolve_implementation(implementation: str | None, q) -> str:
  """The kernel `implementation` names for queries like `q` on `platform()`."""
  if implementation not in (None, *IMPLEMENTATIONS):
    raise UserError(f"attention_impl={implementation!r} is not an attention implementation; use one "
                    f"of {list(IMPLEMENTATIONS)} or None (= auto: the platform's best)")
  target = platform()
  if implementation in (None, "auto"):
    if target == "cpu":
      return "cpu"
    if target == "gpu":
      return "cudnn" if cudnn_supports(q) else "xla"
    return "xla"
  if implementation == "pallas_tpu" and target != "tpu":
    raise UserError(f"attention_impl='pallas_tpu' runs on TPU only, found platform {target!r}; "
                    "use None (auto), or 'pallas_tpu_interpret' to run the kernel in the Pallas "
                    "interpreter (slow; for tests)")
  if implementation == "cudnn" and target != "gpu":
    raise UserError(f"attention_impl='cudnn' runs on GPU only, found platform {target!r}; use "
                    "None (auto) or 'xla'")
  return implementation


def cudnn_supports(q) -> bool:
  """Does the cuDNN flash kernel take queries like q [B, T, H, Dh] (dtype and head size)?"""
  d = q.shape[-1]
  return (any(q.dtype == dt for dt in CUDNN_DTYPES) and d <= CUDNN_MAX_HEAD_DIM
          and d % CUDNN_HEAD_DIM_MULTIPLE == 0)


def _check_inputs(q, k, v, mask, scale) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
    raise UserError(f"attention: expected q [B, T, H, Dh] and k, v of one shape [B, S, Hkv, Dh], "
                    f"found q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}")
  (b, t, h, d), (bk, s, hkv, dk) = q.shape, k.shape
  if bk != b or dk != d or h % hkv:
    raise UserError(f"attention: k/v {list(k.shape)} do not fit q {list(q.shape)}: batch and head "
                    f"dim must match and the {h} query heads must be a multiple of the {hkv} kv heads")
  if mask is not None:
    if mask.dtype != jnp.bool_ or mask.ndim > 4:
      raise UserError(f"attention: mask must be bool with at most 4 dims, found {mask.dtype} "
                      f"{list(mask.shape)}")
    padded = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    if any(m not in (1, n) for m, n in zip(padded, (b, h, t, s))):
      raise UserError(f"attention: mask {list(mask.shape)} does not broadcast to [B, H, T, S] = "
                      f"{[b, h, t, s]}")
  if scale is not None and not isinstance(scale, (int, float)) and jnp.shape(scale) not in ((), (b,)):
    raise UserError(f"attention: scale must be a float, a scalar array or an array [B] = [{b}], "
                    f"found shape {list(jnp.shape(scale))}")


def masked_logit(dtype) -> float:
  """The logit given to masked keys (finite, so a fully masked row softmaxes to uniform)."""
  return -MASKED_LOGIT_FRACTION * float(jnp.finfo(dtype).max)


# -- cpu: heads-leading batched matmuls in cache-sized batch chunks -----------------------------------
def _cpu_attention(q, k, v, mask, scale: float):
  b, t, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  g = h // hkv
  qh = q.reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * t, d)
  kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  mh = None if mask is None else _group_mask(mask, hkv, g, t)
  c = _batch_chunk(b, hkv * g * t * s * 4)
  if c == b:
    out = _attention_rows(qh, kh, vh, mh, scale)
  else:
    split = lambda x: x.reshape(b // c, c, *x.shape[1:])  # noqa: E731
    xs = (split(qh), split(kh), split(vh))
    if mh is not None and mh.shape[0] == b:
      out = jax.lax.map(lambda a: _attention_rows(*a, scale), (*xs, split(mh)))
    else:
      out = jax.lax.map(lambda a: _attention_rows(*a, mh, scale), xs)
    out = out.reshape(b, *out.shape[2:])
  return out.reshape(b, hkv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _group_mask(mask, hkv: int, g: int, t: int):
  """mask [Bm, Hm, Tm, Sm] (broadcastable to [B, H, T, S]) -> [Bm, Hkv or 1, G T or 1, Sm], rows
  ordered as the grouped queries (g, t)."""
  mb, mh, mt, ms = mask.shape
  heads = hkv if mh > 1 else 1
  groups = g if mh > 1 else 1
  m = mask.reshape(mb, heads, groups, mt, ms)
  if groups == 1 and mt == 1:
    return m.reshape(mb, heads, 1, ms)
  return jnp.broadcast_to(m, (mb, heads, g, t, ms)).reshape(mb, heads, g * t, ms)


def _batch_chunk(b: int, row_bytes: int) -> int:
  """The largest divisor c of b with c * row_bytes <= CPU_CHUNK_BYTES (at least 1)."""
  fit = max(1, CPU_CHUNK_BYTES // max(row_bytes, 1))
  return max(c for c in range(1, b + 1) if b % c == 0 and c <= fit)


@functools.partial(jax.checkpoint, static_argnums=(4,))
def _attention_rows(qh, kh, vh, mask, scale: float):
  """qh [b, Hkv, R, Dh], kh/vh [b, Hkv, S, Dh], mask broadcastable to [b, Hkv, R, S] or None ->
  [b, Hkv, R, Dh]. exp(logits - max) multiplies v unnormalised; the [R, Dh] product is divided by
  the row sums (R Dh divisions instead of R S). Recomputed in the backward pass (flash-style): only
  the chunk's inputs are saved, so its [b, Hkv, R, S] blocks are made and used while in cache
  (measured 1.25x faster forward+backward than saving them, see launch/benchmark.py --parts=attention)."""
  acc = jnp.promote_types(qh.dtype, jnp.float32)
  logits = jnp.einsum("bhrd,bhsd->bhrs", qh, kh, preferred_element_type=acc) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, masked_logit(acc))
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # softmax is shift-invariant
  e = jnp.exp(logits - top)
  total = jnp.sum(e, axis=-1, keepdims=True)
  out = jnp.einsum("bhrs,bhsd->bhrd", e.astype(vh.dtype), vh, preferred_element_type=acc)
  return (out / total).astype(qh.dtype)


# -- pallas: the TPU flash-attention kernel ------------------------------------------------------------
def _pallas_attention(q, k, v, mask, scale: float, interpret: bool):
  from jax.experimental.pallas import tpu as pltpu
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  b, t, h, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  block_q, block_k = min(PALLAS_BLOCK, t), PALLAS_BLOCK
  if t % block_q or s % block_k:
    raise UserError(f"attention_impl='pallas_tpu': the key length ({s}) must be a multiple of "
                    f"{PALLAS_BLOCK} and the query length ({t}) one too or shorter; use 'xla' for "
                    "these shapes")
  qh = jnp.swapaxes(q, 1, 2)
  kh = jnp.repeat(jnp.swapaxes(k, 1, 2), h // hkv, axis=1)
  vh = jnp.repeat(jnp.swapaxes(v, 1, 2), h // hkv, axis=1)
  bias = None
  if mask is not None:
    full = jnp.broadcast_to(mask, (b, h, t, s))
    # a fully masked row attends to every key with a zero query: uniform weights, no gradient to
    # its query or through its logits (the kernel itself gives NaN for rows without a key)
    live = jnp.any(full, axis=-1, keepdims=True)
    qh = jnp.where(live, qh, jnp.zeros_like(qh))
    bias = jnp.where(full | ~live, 0.0, masked_logit(jnp.float32)).astype(jnp.float32)
  blocks = fa.BlockSizes(block_q=block_q, block_k_major=block_k, block_k=block_k, block_b=1,
                         block_q_major_dkv=block_q, block_k_major_dkv=block_k, block_k_dkv=block_k,
                         block_q_dkv=block_q, block_k_major_dq=block_k, block_k_dq=block_k,
                         block_q_dq=block_q)
  call = lambda qh, kh, vh, bias: fa.flash_attention(  # noqa: E731
      qh, kh, vh, ab=bias, sm_scale=scale, block_sizes=blocks)
  if interpret:
    call = _traced_in_interpret_mode(call, pltpu.force_tpu_interpret_mode)
  return jnp.swapaxes(call(qh, kh, vh, bias), 1, 2)


def _traced_in_interpret_mode(fn, interpret_mode):
  """fn with its forward and its backward kernels both traced under `interpret_mode()` (the
  backward pallas_calls are traced when the cotangent arrives, outside any caller's context)."""
  @jax.custom_vjp
  def wrapped(*args):
    with interpret_mode():
      return fn(*args)

  def fwd(*args):
    with interpret_mode():
      return jax.vjp(fn, *args)

  def bwd(vjp_fn, cot):
    with interpret_mode():
      return vjp_fn(cot)

  wrapped.defvjp(fwd, bwd)
  return wrapped


__all__ = ["IMPLEMENTATIONS", "dot_product_attention", "resolve_implementation", "cudnn_supports",
           "masked_logit"]
