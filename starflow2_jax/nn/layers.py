"""Basic layers: PyTorch-compatible Dense, LayerNorm, RMSNorm, MLPs.

Every weight carries logical axis names, and constrained activations carry their own `activation_*`
names (distinct from the weight names; `starflow2_jax.parallel.DEFAULT_LOGICAL_RULES` maps both to mesh
axes). Parameters are stored in `param_dtype` (float32 by default) and cast to `dtype` (the
compute dtype) at use.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

# PyTorch's default Linear init is kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in)) for the weight,
# and U(+-1/sqrt(fan_in)) for the bias.
# Logical names of activations [B, T, ...] (never used for weights).
ACT_EMBED = ("activation_batch", "activation_length", "activation_embed")
ACT_MLP = ("activation_batch", "activation_length", "activation_mlp")
ACT_VOCAB = ("activation_batch", "activation_length", "activation_vocab")
ACT_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")
ACT_KV_HEADS = ("activation_batch", "activation_length", "activation_kv_heads", "activation_head_dim")

torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Initializer:
  bound = 1.0 / (fan_in ** 0.5)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def normal_init(std: float) -> Initializer:
  return nn.initializers.normal(stddev=std)


class Dense(nn.Module):
  """y = x @ kernel + bias over the last axis. kernel: [in, features] (PyTorch weight transposed).

  `axes` names the kernel's two logical axes; the bias takes the second one.
  """
  features: int
  axes: tuple[str | None, str | None] = ("embed", "mlp")
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer | None = None
  bias_init: Initializer | None = None
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(self.kernel_init or torch_kernel_init, self.axes),
        (fan_in, self.features), self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), precision=self.precision)
    if self.use_bias:
      bias = self.param(
          "bias", nn.with_logical_partitioning(self.bias_init or torch_bias_init(fan_in), self.axes[1:]),
          (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class LayerNorm(nn.Module):
  """LayerNorm with statistics in float32 (PyTorch semantics), output cast to `dtype`."""
  eps: float = 1e-5
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    x32 = x.astype(stat_dtype)
    mean = jnp.mean(x32, -1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (d,), self.param_dtype)
    y = y * scale.astype(stat_dtype)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axis_name,)),
                        (d,), self.param_dtype)
      y = y + bias.astype(stat_dtype)
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """RMSNorm: normalise in float32, cast to `dtype`, then multiply by `(scale_offset + scale)`.

  Qwen2.5: scale_offset=0, scale init 1 (cast-before-multiply order matters for bf16 parity).
  STARFlow final norm: scale_offset=1, scale init 0, dtype float32.
  """
  eps: float = 1e-6
  scale_offset: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    stat_dtype = jnp.promote_types(x.dtype, jnp.float32)
    x32 = x.astype(stat_dtype)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
    init = nn.initializers.zeros if self.scale_offset else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, (self.axis_name,)), (d,),
                       self.param_dtype)
    return y.astype(self.dtype) * (self.scale_offset + scale).astype(self.dtype)


def make_norm(kind: str, eps: float, dtype: Dtype, param_dtype: Dtype, name: str | None = None):
  if kind == "layernorm":
    return LayerNorm(eps=eps, dtype=dtype, param_dtype=param_dtype, name=name)
  if kind == "rmsnorm":
    return RMSNorm(eps=eps, dtype=dtype, param_dtype=param_dtype, name=name)
  raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


class Mlp(nn.Module):
  """Transformer MLP. kind='gelu': fc2(gelu_exact(fc1 x)); kind='swiglu': down(silu(gate x) * up x).

  x: [..., d] -> [..., d].
  """
  hidden: int
  kind: str = "gelu"
  use_bias: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    dense = lambda f, axes, name: Dense(f, axes, self.use_bias, self.dtype, self.param_dtype, name=name)
    if self.kind == "gelu":
      h = dense(self.hidden, ("embed", "mlp"), "fc1")(x)
      h = nn.with_logical_constraint(h, ACT_MLP)
      return dense(d, ("mlp", "embed"), "fc2")(jax.nn.gelu(h, approximate=False))
    if self.kind == "swiglu":
      g = dense(self.hidden, ("embed", "mlp"), "gate")(x)
      u = dense(self.hidden, ("embed", "mlp"), "up")(x)
      h = nn.with_logical_constraint(jax.nn.silu(g) * u, ACT_MLP)
      return dense(d, ("mlp", "embed"), "down")(h)
    raise ValueError(f"mlp kind must be 'gelu' or 'swiglu', got {self.kind!r}")


def check_shape(name: str, x: jax.Array, expected: Sequence[int | None]) -> None:
  """Raise a ValueError naming `name` unless x.shape matches `expected` (None = any)."""
  if len(x.shape) != len(expected) or any(e is not None and e != s for s, e in zip(x.shape, expected)):
    exp = ", ".join("*" if e is None else str(e) for e in expected)
    got = ", ".join(str(s) for s in x.shape)
    raise ValueError(f"{name}: expected shape [{exp}], got [{got}]")
