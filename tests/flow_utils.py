"""Tiny flow models for tests: random non-zero proj_out (the zero production init hides bugs)."""
import jax
import jax.numpy as jnp
import numpy as np

from starflow2_jax import flows


def tiny_config(parametrisation="tarflow", layers=(1, 2), num_classes=0, context_dim=0,
                dtype="float32", image=(4, 6), channels=2, patch=2, **kw):
  star = parametrisation == "starflow"
  base = dict(
      image_size=image, channels=channels, patch_size=patch, layout=parametrisation,
      parametrisation=parametrisation, width=32, head_dim=16, layers_per_block=tuple(layers),
      permutation_rule="starflow2" if star else "tarflow",
      conditioning="deep" if star else "all", positions="rope2d" if star else "learned",
      num_classes=num_classes, context_dim=context_dim, dtype=dtype, param_dtype=dtype)
  base.update(kw)
  return flows.FlowConfig(**base)


def randomize_heads(variables, scale=0.3, seed=0):
  """Give every proj_out kernel random values (and keep the rest)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  out = []
  for i, (path, leaf) in enumerate(leaves):
    name = jax.tree_util.keystr(path)
    if "proj_out" in name and "kernel" in name:
      leaf = scale * jax.random.normal(jax.random.key(seed + i), leaf.shape, leaf.dtype)
    out.append(leaf)
  return jax.tree_util.tree_unflatten(treedef, out)


_BUILT = {}  # (build's arguments, x64 mode) -> its result: each model is initialised once per session


def build(cfg, batch=2, seed=0, head_scale=None, context_len=3):
  """-> (model, variables, x [B,T,D], labels or None, context or None). Built (traced, compiled) once per
  arguments; every call gets its own dict containers (a test may edit them), the arrays are immutable."""
  key = (cfg, batch, seed, head_scale, context_len, bool(jax.config.jax_enable_x64))
  try:
    hash(key)
  except TypeError:  # a config with an unhashable field: built afresh
    return _build(cfg, batch, seed, head_scale, context_len)
  if key not in _BUILT:
    _BUILT[key] = _build(cfg, batch, seed, head_scale, context_len)
  model, variables, x, labels, context = _BUILT[key]
  return model, jax.tree.map(lambda a: a, variables), x, labels, context


def _build(cfg, batch, seed, head_scale, context_len):
  model = flows.FlowModel(cfg)
  fdt = cfg.flow_dtype
  k = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k[0], (batch, cfg.num_tokens, cfg.token_dim), fdt)
  labels = jnp.arange(batch, dtype=jnp.int32) % cfg.num_classes if cfg.num_classes else None
  context = (jax.random.normal(k[1], (batch, context_len, cfg.context_dim), fdt)
             if cfg.context_dim else None)
  variables = jax.jit(model.init)(k[2], x, labels, context)
  variables = flows_unbox(variables)
  if head_scale is None:  # TarFlow's exp scale is unbounded: keep random maps well conditioned
    head_scale = 0.05 if cfg.parametrisation == "tarflow" else 0.3
  return model, randomize_heads(variables, head_scale, seed), x, labels, context


def flows_unbox(variables):
  import flax.linen as nn
  return nn.unbox(variables)


def np64(x):
  return np.asarray(x, np.float64)


_JITTED = {}  # (kind, id(model), kw) -> (model, jitted fn): one trace per model shared by the tests


def _shared(kind, model, kw, make):
  try:
    key = (kind, id(model), tuple(sorted(kw.items())))
    hash(key)
  except TypeError:  # an unhashable option: a function of its own
    return make()
  if key not in _JITTED:
    _JITTED[key] = (model, make())  # holding the model keeps its id unique
  return _JITTED[key][1]


def reverse_fn(model, **kw):
  """Jitted flows.reverse(model, variables, z, labels, context, uncond_context, **kw)."""
  return _shared("reverse", model, kw, lambda: jax.jit(
      lambda v, z, l=None, c=None, uc=None: flows.reverse(model, v, z, l, c, uc, **kw)))


def forward_fn(model):
  return _shared("forward", model, {}, lambda: jax.jit(lambda v, x, l=None, c=None: model.apply(v, x, l, c)))


def assert_close_to_scale(a, b, tol=1e-5):
  """max|a - b| <= tol * max(1, max|b|): REFERENCE-BEHAVIOURS' "relative to scale" tolerance."""
  a, b = np64(a), np64(b)
  err, scale = np.max(np.abs(a - b)), max(1.0, np.max(np.abs(b)))
  assert err <= tol * scale, f"max abs error {err:.3g} > {tol:g} * {scale:.3g}"
