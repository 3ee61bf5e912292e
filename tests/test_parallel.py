"""Meshes, logical rules and global batches (parallel.py)."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from starflow2_jax import parallel


def test_mesh_fill_and_auto_axes():
  mesh = parallel.make_mesh({"shape": {"data": -1, "fsdp": 2, "tensor": 1}})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  one = parallel.make_mesh({"shape": {"data": -1}}, jax.devices()[:1])
  assert one.size == 1


@pytest.mark.parametrize("shape,match", [
    ({"data": 3}, r"needs 3 devices, found 8"),
    ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"data": -1, "fsdp": 3}, "not divisible by 3"),
    ({"batch": 8}, r"unknown mesh axes \['batch'\]"),
])
def test_mesh_errors_name_the_field(shape, match):
  with pytest.raises(ValueError, match=match):
    parallel.make_mesh({"shape": shape})


def test_dcn_slices_must_divide_devices():
  with pytest.raises(ValueError, match="mesh.dcn_shape"):
    parallel.make_mesh({"shape": {"data": -1}, "dcn_shape": {"data": 3}})


def test_logical_rules_from_config_and_errors():
  import ml_collections
  cfg = ml_collections.ConfigDict({"sharding": parallel.default_sharding_config()})
  rules = dict(parallel.logical_rules(cfg))
  assert rules["activation_batch"] == ("data", "fsdp") and rules["mlp"] == "tensor"
  assert rules["cache_kv_heads"] == "tensor" and rules["length"] is None and rules["layers"] is None
  cfg.sharding.logical_rules = [["embed", "model"]]
  with pytest.raises(ValueError, match=r"logical_rules\['embed'\] names mesh axes \['model'\]"):
    parallel.logical_rules(cfg)


def test_logical_to_shardings_and_indivisible_dims_replicate():
  import flax.linen as nn
  mesh = parallel.make_mesh({"shape": {"data": 1, "fsdp": 4, "tensor": 2}})
  tree = {"a": nn.Partitioned(jax.ShapeDtypeStruct((8, 6), np.float32), names=("embed", "mlp")),
          "b": nn.Partitioned(jax.ShapeDtypeStruct((6, 4), np.float32), names=("embed", "mlp")),
          "c": jax.ShapeDtypeStruct((3,), np.float32)}
  sh = parallel.logical_to_shardings(tree, mesh, parallel.DEFAULT_LOGICAL_RULES)
  assert sh["a"].spec == P("fsdp", "tensor")
  assert sh["b"].spec == P(None, "tensor")  # 6 is not divisible by fsdp=4: replicated there
  assert sh["c"].is_fully_replicated


def test_batch_checks_and_global_batch():
  mesh = parallel.make_mesh({"shape": {"data": 2, "fsdp": 4}})
  with pytest.raises(ValueError, match=r"train.batch_size=12.*data x fsdp = 2 x 4 = 8"):
    parallel.check_global_batch(12, mesh)
  with pytest.raises(ValueError, match="train.grad_accum=4"):
    parallel.check_global_batch(16, mesh, micro_batches=4)
  parallel.check_global_batch(32, mesh, micro_batches=4)
  local = {"x": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  g = parallel.make_global_batch(local, mesh, 16)["x"]
  assert g.shape == (16, 3) and g.sharding.spec == P(("data", "fsdp"), None)
  np.testing.assert_array_equal(np.asarray(g), local["x"])


def test_initialize_distributed_is_a_noop_on_one_host(monkeypatch):
  for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
            "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(k, raising=False)
  assert parallel.initialize_distributed() is False
