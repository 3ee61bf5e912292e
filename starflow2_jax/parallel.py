"""Meshes, the logical-axis rules table, multi-process start-up and global-array helpers.

Every sharding in the project is decided by one table (`DEFAULT_LOGICAL_RULES`, overridable by an
experiment config) that maps logical axis names to the mesh axes `data`, `fsdp`, `tensor`. Three kinds
of names, never mixed:
  weights      (`nn.with_logical_partitioning`): embed, mlp, heads, kv_heads, qkv, vocab, layers, ...
  activations  (`nn.with_logical_constraint`): activation_batch, activation_length, activation_embed, ...
  KV caches    (`nn.KVCache`): cache_layers, cache_batch, cache_length, cache_kv_heads, cache_head_dim

  config.mesh.shape      {"data": -1, "fsdp": 1, "tensor": 1}   -1 = fill with the remaining devices
  config.mesh.dcn_shape  {"data": 1, "fsdp": 1, "tensor": 1}    slices across DCN (multi-slice TPU)
  config.sharding.logical_rules  optional override of the table: [["embed", "fsdp"], ...]

Checkpoints carry no rules: the caller's mesh and config decide. Activation and cache constraints are
active only inside `sharding_context(mesh, rules)` (the train step, evaluation, `flows.reverse`,
`vlm.generate` are traced inside it); outside it they are no-ops (one device).
The batch of a train step is split over `data` and `fsdp` (`BATCH_AXES`); parameters are split by the
rules (FSDP over `fsdp`, Megatron-style over `tensor`).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from starflow2_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the global batch is split over these mesh axes, in this order

# The default table. Weights: FSDP shards the embedding dimension, tensor parallelism the MLP hidden
# dimension, attention heads (fused qkv included), the vocabulary; stacked layers are not split.
# Activations: batch over data x fsdp, heads / MLP / vocabulary over tensor, the embedding replicated.
# Caches: batch over data x fsdp, KV heads over tensor.
DEFAULT_LOGICAL_RULES = (
    # weights
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("qkv", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("length", None),
    ("layers", None),
    ("latent", None),
    ("classes", None),
    ("context", None),
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # KV caches
    ("cache_layers", None),
    ("cache_batch", BATCH_AXES),
    ("cache_length", None),
    ("cache_kv_heads", "tensor"),
    ("cache_head_dim", None),
)


def default_mesh_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "shape": {"data": -1, "fsdp": 1, "tensor": 1},
      "dcn_shape": {"data": 1, "fsdp": 1, "tensor": 1},
  })


def default_sharding_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "logical_rules": [[k, list(v) if isinstance(v, tuple) else v] for k, v in DEFAULT_LOGICAL_RULES]
  })


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids: Sequence[int] | None = None
                           ) -> bool:
  """Start `jax.distributed` when running multi-process; a no-op on a single host.

  Multi-process is detected from explicit arguments, or from the environment JAX already understands
  (TPU pod metadata, SLURM, `JAX_COORDINATOR_ADDRESS`). Returns True if it initialised.
  """
  explicit = coordinator_address is not None or (num_processes or 1) > 1
  env = any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                                      "MEGASCALE_COORDINATOR_ADDRESS"))
  if not explicit and not env:
    return False
  if jax.distributed.is_initialized():
    return True
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def _resolve(shape: dict, n: int, what: str) -> tuple[int, ...]:
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise UserError(f"{what}: unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
  sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"{what}={dict(zip(MESH_AXES, sizes))}: sizes must be positive, with at most one -1")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if n % known:
      raise UserError(f"{what}={dict(zip(MESH_AXES, sizes))}: {n} devices are not divisible by {known}")
    sizes[fill[0]] = n // known
  if math.prod(sizes) != n:
    raise UserError(f"{what}={dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                    f"found {n}; use -1 on one axis to fill")
  return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict | dict,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh with Auto axis types.

  `mesh_config.shape` is the per-slice (ICI) shape; `mesh_config.dcn_shape` (optional) the number of
  slices along each axis. With more than one slice the devices are laid out with
  `mesh_utils.create_hybrid_device_mesh` so that DCN traffic stays on the outer axis parts.
  """
  devices = list(devices if devices is not None else jax.devices())
  dcn = dict(mesh_config.get("dcn_shape", None) or {})
  dcn_sizes = _resolve({a: dcn.get(a, 1) for a in MESH_AXES}, math.prod(dcn.get(a, 1) for a in MESH_AXES),
                       "mesh.dcn_shape") if dcn else (1, 1, 1)
  num_slices = math.prod(dcn_sizes)
  if len(devices) % num_slices:
    raise UserError(f"mesh.dcn_shape={dcn}: {len(devices)} devices do not split into {num_slices} slices")
  ici = _resolve(dict(mesh_config["shape"]), len(devices) // num_slices, "mesh.shape")
  if num_slices > 1:
    # TPU slices are the DCN granules; elsewhere (GPU hosts) each process is one
    grid = mesh_utils.create_hybrid_device_mesh(
        ici, dcn_sizes, devices, process_is_granule=not hasattr(devices[0], "slice_index"))
  else:
    try:
      grid = mesh_utils.create_device_mesh(ici, devices)
    except (AssertionError, NotImplementedError, ValueError):  # device kinds without a topology model
      grid = np.asarray(devices).reshape(ici)
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_rules(config: ml_collections.ConfigDict | None) -> tuple[tuple[str, Any], ...]:
  """The rules table from `config.sharding.logical_rules` as a tuple of (logical, mesh axes) pairs."""
  raw = DEFAULT_LOGICAL_RULES
  if config is not None and "sharding" in config and "logical_rules" in config.sharding:
    raw = config.sharding.logical_rules
  rules = []
  for pair in raw:
    if len(pair) != 2:
      raise UserError(f"sharding.logical_rules entry {pair!r}: expected [logical_name, mesh_axis or null]")
    name, axes = pair
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      bad = [a for a in axes if a not in MESH_AXES]
    else:
      bad = [axes] if axes is not None and axes not in MESH_AXES else []
    if bad:
      raise UserError(f"sharding.logical_rules[{name!r}] names mesh axes {bad}; the axes are {MESH_AXES}")
    rules.append((name, axes))
  return tuple(rules)


def _fit_spec(spec: P, shape: Sequence[int], mesh, name: str) -> P:
  """Drop mesh axes from dimensions they do not divide (tiny parameters stay replicated there)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = math.prod(mesh.shape[a] for a in names)
    if names and dim % size:
      logging.log_first_n(logging.INFO, "%s: dimension %d is not divisible by mesh axes %s (size %d); "
                          "replicating it", 20, name, dim, names, size)
      out.append(None)
    else:
      out.append(axes)
  return P(*out)


def logical_to_specs(abstract_tree: Any, mesh, rules) -> Any:
  """Mesh PartitionSpecs for a (possibly `nn.Partitioned`-boxed) abstract tree, via the logical rules.

  mesh: a Mesh or an AbstractMesh (only its axis sizes are read). Leaves without logical names are
  replicated; mesh axes that do not divide a dimension are dropped there. Returns a tree shaped like
  the unboxed tree.
  """
  logical = nn.get_partition_spec(abstract_tree)
  unboxed = nn.unbox(abstract_tree)
  mesh_specs = nn.logical_to_mesh(logical, rules)

  def one(path, spec, leaf):
    spec = spec if isinstance(spec, P) else P()
    return _fit_spec(spec, leaf.shape, mesh, jax.tree_util.keystr(path))

  return jax.tree_util.tree_map_with_path(one, mesh_specs, unboxed,
                                          is_leaf=lambda x: isinstance(x, P) or x is None)


def logical_to_shardings(abstract_tree: Any, mesh, rules) -> Any:
  """`logical_to_specs` as NamedShardings on `mesh`."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                      logical_to_specs(abstract_tree, mesh, rules),
                      is_leaf=lambda x: isinstance(x, P))


def sharding_context(mesh: jax.sharding.Mesh | None, rules=DEFAULT_LOGICAL_RULES):
  """Inside: `mesh` and the logical `rules` are active, so the activation and cache constraints of
  every model shard by the same table as the train step. Trace (call) jitted samplers inside it.
  A no-op without a mesh (one device)."""
  stack = contextlib.ExitStack()
  if mesh is not None:
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(tuple(rules)))
  return stack


def param_shardings(abstract_tree: Any, mesh: jax.sharding.Mesh | None, rules) -> Any:
  """`logical_to_shardings`, or everything on the first device when there is no mesh."""
  if mesh is None:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: dev, nn.unbox(abstract_tree))
  return logical_to_shardings(abstract_tree, mesh, rules)


def inference_mesh(fsdp: int, tensor: int) -> jax.sharding.Mesh:
  """A (data=1, fsdp, tensor) mesh over the first fsdp*tensor devices (sampling, chat)."""
  n = fsdp * tensor
  if n > jax.device_count():
    raise UserError(f"mesh fsdp={fsdp} x tensor={tensor} needs {n} devices, found {jax.device_count()}")
  return make_mesh({"shape": {"data": 1, "fsdp": fsdp, "tensor": tensor}}, jax.devices()[:n])


def compile_only(mesh) -> bool:
  """True for a mesh over devices nothing can be placed on: an AbstractMesh, or the devices of a TPU
  topology description (`launch.compile` on any machine). Builders then give shapes, not arrays."""
  if isinstance(mesh, jax.sharding.AbstractMesh):
    return True
  device = mesh.devices.flat[0]
  try:
    return device not in jax.local_devices(backend=device.platform)
  except RuntimeError:  # no backend of that platform in this process
    return True


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_shards(mesh: jax.sharding.Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_global_batch(global_batch: int, mesh: jax.sharding.Mesh, micro_batches: int = 1) -> None:
  """The global batch must split into `micro_batches` micro-batches, each split over data x fsdp,
  and evenly over the processes."""
  shards = batch_shards(mesh)
  if global_batch % micro_batches or (global_batch // micro_batches) % shards:
    raise UserError(
        f"train.batch_size={global_batch} with train.grad_accum={micro_batches}: each micro-batch "
        f"({global_batch}/{micro_batches}) must be divisible by the data axes data x fsdp = "
        f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {shards}; change train.batch_size or mesh.shape")
  if global_batch % jax.process_count():
    raise UserError(f"train.batch_size={global_batch} is not divisible by the {jax.process_count()} "
                    "processes")


def host_batch_slice(global_batch: int) -> slice:
  """Rows of the global batch that this process loads (contiguous; process order)."""
  per = global_batch // jax.process_count()
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def make_global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh, global_batch: int
                      ) -> dict[str, jax.Array]:
  """Assemble this host's rows [global_batch/num_processes, ...] into global arrays split over data x fsdp."""
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v,
                                                    (global_batch,) + v.shape[1:])
  return out
