"""Ahead-of-time compilation (issue 12): topology names, FLOPs with loop trip counts, the memory and
FLOP report, the not-fit message, a saved step that `launch.train` runs, and the STARFlow2 generation
step (decode with both KV caches sharded by the rules; FLOPs per token and image).

The CPU tests compile for the 8 fake CPU devices of conftest.py. The TPU tests compile for named TPU
topologies with libtpu and are skipped when libtpu is not installed; CI exercises them in a job that
installs the `[tpu]` extra (`pip install -e '.[test,tpu]' && pytest tests/test_compile.py`).
"""
import importlib.util
import os
import pickle
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from starflow2_jax.errors import UserError
from starflow2_jax.nn import attention_ops
from starflow2_jax.scale import abstract, generation, hlo_flops, model_flops, report, saved, topology
from starflow2_jax.train import loop
from train_runner import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed: pip install -e '.[tpu]'")


@pytest.mark.parametrize("name, chips, shape", [
    ("v5p-64", 32, (2, 4, 4)), ("v5p-8", 4, (2, 2, 1)), ("v4-128", 64, (4, 4, 4)),
    ("v5e-256", 256, (16, 16)), ("v6e-64", 64, (8, 8)), ("v5e-8", 8, (2, 4)),
    ("v5p:2x4x4", 32, (2, 4, 4)), ("v5litepod-16", 16, (4, 4))])
def test_topology_names(name, chips, shape):
  t = topology.parse(name)
  assert (t.chips, t.shape, t.is_tpu) == (chips, shape, True)


def test_topology_chip_tables():
  assert topology.parse("v5p-64").hbm_bytes == 95 * 2 ** 30
  assert topology.parse("v5e-256").peak_flops == 197e12
  assert topology.parse("cpu:8").hbm_bytes is None


@pytest.mark.parametrize("name, match", [
    ("v5p-63", "TensorCores"), ("v5e-12", "chips"), ("v7x-8", "unknown TPU generation"),
    ("v5p:4x4", "3-D"), ("tpu", "expected a Cloud TPU name"), ("cpu:x", "cpu:N")])
def test_bad_topology_names_fail_clearly(name, match):
  with pytest.raises(UserError, match=match):
    topology.parse(name)


def _scan_grad(n_layers: int, rows: int, width: int):
  def f(x, w):
    h, _ = jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)
    return h.sum()
  return jax.jit(jax.grad(f, argnums=1)).lower(
      jax.ShapeDtypeStruct((rows, width), jnp.float32),
      jax.ShapeDtypeStruct((n_layers, width, width), jnp.float32))


def test_hlo_flops_count_loop_trips_where_xla_counts_the_body_once():
  layers, rows, width = 6, 32, 64
  lowered = _scan_grad(layers, rows, width)
  compiled = lowered.compile()
  exact = 3 * 2 * rows * width * width * layers  # forward + input and weight gradients, every layer
  counted = hlo_flops.count(compiled.as_text())
  assert counted.flops == exact and not counted.unknown_loops
  assert compiled.cost_analysis()["flops"] < exact / 2  # why hlo_flops exists
  # the unoptimized HLO (names without %, loops without known_trip_count) counts the same
  assert hlo_flops.count(lowered.compiler_ir(dialect="hlo").as_hlo_text()).flops == exact
  assert loop._flops_per_step(compiled) == exact  # the train loop's FLOP/s and MFU use this count


TPU_STYLE_LOOP = """HloModule m

%body (p: (u32[], f32[8,4], f32[4,4])) -> (u32[], f32[8,4], f32[4,4]) {
  %p = (u32[], f32[8,4], f32[4,4]) parameter(0)
  %i = u32[] get-tuple-element(%p), index=0
  %x = f32[8,4] get-tuple-element(%p), index=1
  %w = f32[4,4] get-tuple-element(%p), index=2
  %two = u32[] constant(2)
  %next = u32[] add(%i, %two)
  %y = f32[8,4] convolution(%x, %w), dim_labels=bf_io->bf
  ROOT %t = (u32[], f32[8,4], f32[4,4]) tuple(%next, %y, %w)
}

%cond (q: (u32[], f32[8,4], f32[4,4])) -> pred[] {
  %q = (u32[], f32[8,4], f32[4,4]) parameter(0)
  %n = u32[] constant(16)
  %j = u32[] get-tuple-element(%q), index=0
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

ENTRY %main (a: f32[8,4], b: f32[4,4]) -> f32[8,4] {
  %a = f32[8,4] parameter(0)
  %b = f32[4,4] parameter(1)
  %zero = u32[] constant(0)
  %init = (u32[], f32[8,4], f32[4,4]) tuple(%zero, %a, %b)
  %loop = (u32[], f32[8,4], f32[4,4]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8,4] get-tuple-element(%loop), index=1
}
"""


def test_hlo_flops_reads_tpu_loop_bounds_and_steps():
  """A TPU collective-matmul loop: no known_trip_count, counter + 2 < 16: 8 trips of 2*8*4*4."""
  counted = hlo_flops.count(TPU_STYLE_LOOP)
  assert counted.loops == {"loop": 8} and counted.flops == 8 * 2 * 8 * 4 * 4


def _small(**overrides):
  return tiny_config(**{"mesh.shape": {"data": 2, "fsdp": 4, "tensor": 1}, **overrides})


@pytest.fixture(scope="module")
def cpu_report():
  return report.compile_report(_small(), "cpu:8", "tiny")


def test_report_memory_and_flops(cpu_report):
  r = cpu_report
  assert r.devices == 8 and r.mesh == {"data": 2, "fsdp": 4, "tensor": 1} and r.fits is None
  m = r.memory
  assert m["total"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] + m["code"]
  assert m["aliased"] > 0  # the donated state is updated in place
  # remat none: the compiled matmuls are the analytical 6ND + attention, to within the extras (the
  # non-kernel embeddings, the flow heads' float32 highest-precision parts)
  assert 0.9 < r.flop_ratio < 1.25, r.flop_ratio
  text = report.format_report(r)
  assert "compiled / analytical" in text and "arithmetic, not a measurement" not in text  # no CPU peak


def test_analytical_flops_of_the_flow():
  config = _small()
  plan = abstract.build(config, jax.devices()[:8])
  got = model_flops.train_step_flops(plan.config, plan.state.params, plan.trainable, None, 16)
  kernels = model_flops.kernel_params(plan.state.params)
  t, b = 16, 16  # 8x8 images of 2x2 patches; batch 16
  assert got.trained == 6 * kernels * b * t
  assert got.attention == 3 * 4 * b * t * t * 32 * 2  # width 32, 2 layers
  assert got.tokens == b * t


def test_not_fit_lists_the_largest_buffers(cpu_report):
  r = cpu_report.against(1024)
  assert r.fits is False and r.largest_buffers
  sizes = [b for _, b in r.largest_buffers]
  assert sizes == sorted(sizes, reverse=True)
  text = report.format_report(r)
  assert "DOES NOT FIT" in text and r.largest_buffers[0][0] in text and "to fit:" in text


def test_attention_auto_is_chosen_for_the_target_platform():
  q = jnp.zeros((1, 4, 2, 8), jnp.float32)
  assert attention_ops.resolve_implementation("auto", q) == "cpu"  # the host's (tests run on CPU)
  with attention_ops.target_platform("tpu"):
    assert attention_ops.resolve_implementation(None, q) == "xla"
    assert attention_ops.resolve_implementation("pallas_tpu", q) == "pallas_tpu"
    with pytest.raises(UserError, match="runs on GPU only, found platform 'tpu'"):
      attention_ops.resolve_implementation("cudnn", q)
  assert attention_ops.platform() == "cpu"
  with pytest.raises(UserError, match="runs on TPU only"):
    attention_ops.resolve_implementation("pallas_tpu", q)


def test_sampling_only_config_gets_the_training_defaults():
  from configs import tarflow_afhq256
  config = abstract.with_train_defaults(tarflow_afhq256.get_config())
  assert (config.data.image_size, config.data.channels) == (256, 3) and "train" in config


def _random_state(plan, seed: int = 0):
  """A train state of the plan's shapes and shardings, floats uniform in [0, 0.1) (valid Adam moments
  too), integers 0: what the compiled step takes, without compiling the initialiser."""
  rng = np.random.default_rng(seed)

  def leaf(x):
    value = (rng.uniform(0.0, 0.1, x.shape).astype(x.dtype) if x.dtype == np.float32
             else np.zeros(x.shape, x.dtype))
    return jax.device_put(value, x.sharding)
  return jax.tree.map(leaf, plan.state)


def test_saved_step_runs_and_refuses_another_run(cpu_report, tmp_path):
  plan = cpu_report.plan
  path = saved.save(str(tmp_path / "step.pkl"), cpu_report.compiled, plan.config, plan.args,
                    plan.mesh)
  with pytest.raises(UserError, match="never overwritten"):
    saved.save(path, cpu_report.compiled, plan.config, plan.args, plan.mesh)
  with pytest.raises(UserError, match=r"config train\.lr: compiled for 0\.001, this run has 0\.0005"):
    saved.load(path, _small(**{"train.lr": 5e-4}), plan.args, plan.mesh)
  wide = abstract.build(_small(**{"model.width": 64}), jax.devices()[:8])
  with pytest.raises(UserError, match=r"argument \[0\]\.(opt_state|params)"):
    saved.load(path, plan.config, wide.args, plan.mesh)
  with pytest.raises(UserError, match="not a compiled train step"):
    (tmp_path / "junk.pkl").write_bytes(pickle.dumps({"format": "other"}))
    saved.load(str(tmp_path / "junk.pkl"), plan.config, plan.args, plan.mesh)
  loaded = saved.load(path, plan.config, plan.args, plan.mesh)
  rng = np.random.default_rng(0)
  batch = {k: jax.device_put(rng.integers(0, 10, s.shape).astype(s.dtype), s.sharding)
           for k, s in plan.batch.items()}
  key = jax.random.key(1)
  _, want = cpu_report.compiled(_random_state(plan), plan.frozen, batch, key)  # each call donates it
  _, got = loaded(_random_state(plan), plan.frozen, batch, key)
  assert float(got["loss"]) == float(want["loss"]) and np.isfinite(float(got["loss"]))


# --- the STARFlow2 generation step ----------------------------------------------------------------

def _starflow2_tiny(**overrides):
  from configs import starflow2_tiny
  config = starflow2_tiny.get_config("stage=3")
  config.mesh.shape = {"data": 2, "fsdp": 2, "tensor": 2}
  for key, value in overrides.items():
    parent, _, field = key.rpartition(".")
    config[parent][field] = value
  return config


@pytest.fixture(scope="module")
def gen_report():
  return generation.compile_report(_starflow2_tiny(), "cpu:8", "starflow2_tiny")


def test_generation_step_caches_are_sharded_by_the_rules(gen_report):
  r = gen_report
  plan = r.plan
  assert (r.conversations, r.rows, r.cache_len) == (4, 4, 96)  # one per data x fsdp shard, unguided
  caches = plan.args[generation.ARG_NAMES.index("caches")]
  rows_axes = ("data", "fsdp")  # cache_batch; KV heads over tensor (parallel.DEFAULT_LOGICAL_RULES)
  for cache in (caches.vlm, caches.deep):
    assert cache.k.shape[1:3] == (4, 96)
    assert cache.k.sharding.spec == P(None, rows_axes, None, "tensor", None)
    assert cache.valid.sharding.spec == P(rows_axes, None)
  assert plan.args[generation.ARG_NAMES.index("tokens")].sharding.spec == P(rows_axes, None)
  assert r.memory["aliased"] > 0  # the donated caches are written in place


def test_generation_step_flops_per_token_and_image(gen_report):
  r = gen_report
  # one position per row: the compiled matmuls are the analytical 2ND + attention over the cache
  assert 0.95 < r.flop_ratio < 1.1, r.flop_ratio
  assert r.flops_per_token == r.compiled_flops / 4
  assert r.flops_per_image == r.flops_per_token * (r.num_latents + 1)
  text = generation.format_report(r)
  assert "per generated token" in text and "fit unknown" in text


def test_generation_plan_guidance_rows_and_kind_check():
  plan = generation.build(_starflow2_tiny(**{"sample.guidance": 2.0}), jax.devices()[:8], 2)
  assert (plan.conversations, plan.rows) == (2, 4)  # [cond; uncond]
  with pytest.raises(UserError, match="model_kind='flow'"):
    generation.build(_small(), jax.devices()[:8])


# --- TPU topologies (libtpu) -----------------------------------------------------------------------
CPU_KERNEL = "bhrd,bhsd->bhrs"  # the einsum of nn.attention_ops' cpu kernel (op names in the HLO)


@needs_libtpu
def test_tpu_batched_matmul_flops_are_exact():
  """TPU lowers batched matmuls to convolutions with the batch in a dilated window: counted once."""
  devices = topology.target_devices(topology.parse("v5e:2x2"))
  mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
  sh = NamedSharding(mesh, P("d"))
  b, h, t, d = 16, 4, 256, 64
  q = jax.ShapeDtypeStruct((b, h, t, d), jnp.bfloat16, sharding=sh)
  compiled = jax.jit(lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k)).lower(q, q).compile()
  assert hlo_flops.count(compiled.as_text()).flops == 2 * b * h * t * t * d / len(devices)


@needs_libtpu
def test_tpu_report_of_a_small_flow():
  r = report.compile_report(_small(**{"mesh.shape": {"data": 1, "fsdp": 4, "tensor": 1}}), "v5e-4")
  assert r.device_kind == "TPU v5 lite" and r.devices == 4 and r.fits is True
  assert CPU_KERNEL not in r.compiled.as_text()  # "auto" attention is the TPU's, not the host's
  assert 0.9 < r.flop_ratio < 1.25 and not r.unknown_loops
  assert r.step_seconds(0.5) == pytest.approx(2 * r.step_seconds(1.0))


@needs_libtpu
def test_tpu_train_step_of_the_tiny_starflow2_runs_every_stream_sharded():
  """Every stream's attention is the TPU kernel (the VLM's config names none): the host's CPU kernel
  scans batch chunks, which made each fsdp shard compute the whole batch's attention."""
  config = _starflow2_tiny(**{"mesh.shape": {"data": 1, "fsdp": 2, "tensor": 2}})
  r = report.compile_report(config, "v5e-4")
  assert r.fits is True and CPU_KERNEL not in r.compiled.as_text()
  assert r.flops_source == "optimized per-device HLO" and 0.9 < r.flop_ratio < 1.4, r.flop_ratio


@needs_libtpu
def test_tpu_generation_step_of_the_tiny_starflow2():
  """One row per chip: the TPU compiler rewrites the matrix-vector products as element-wise
  reductions (fewer matmuls after optimization), so the lowered program's matmuls are counted."""
  config = _starflow2_tiny(**{"mesh.shape": {"data": 1, "fsdp": 2, "tensor": 2}})
  r = generation.compile_report(config, "v5e-4")
  assert r.device_kind == "TPU v5 lite" and r.fits is True and r.rows == 2
  assert 0.95 < r.flop_ratio < 1.1, r.flop_ratio
  assert r.mxu_flops < 0.5 * r.compiled_flops
  assert r.step_seconds(0.5) == max(r.compute_seconds(0.5), r.read_seconds())
  assert r.read_seconds() == r.memory["arguments"] / topology.parse("v5e-4").hbm_bandwidth


_LIST_DEVICES = "import jax; jax.devices()"


@needs_libtpu
def test_libtpu_is_quiet_without_tpu_chips():
  from starflow2_jax.scale import tpu_env
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and k not in tpu_env.QUIET_ENV}
  env["PYTHONPATH"] = ROOT

  def stderr(code):
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120).stderr

  assert "TPU_WORKER_HOSTNAMES" in stderr(_LIST_DEVICES)  # what a plain `import jax` prints here
  quiet = stderr("import starflow2_jax; " + _LIST_DEVICES)
  assert "TPU_WORKER_HOSTNAMES" not in quiet and "host bounds" not in quiet, quiet


# --- golden sharding of the STARFlow2 paper config -------------------------------------------------

STARFLOW2_GOLDEN = os.path.join(ROOT, "tests", "golden", "sharding_starflow2_qwen7b.json")
STARFLOW2_MESHES = {"pod64": (1, 16, 4), "v5p64": (1, 8, 4)}  # the config's mesh; 32 v5p chips


def starflow2_layout() -> dict:
  """{mesh: {tree: {path: {"shape", "spec"}}}} of the paper config (stage 3) under its logical rules:
  the trainable Pretzel parameters and the frozen VLM and FAE, from jax.eval_shape on AbstractMeshes."""
  import flax.linen as nn
  from configs import starflow2_qwen7b
  from starflow2_jax import parallel
  from starflow2_jax.pretzel import config as pconfig, model as pmodel
  from starflow2_jax.train import pretzel_task
  from starflow2_jax.vlm import tokenizer as tok_lib
  from starflow2_jax.vlm.model import abstract_params
  from test_sharding_golden import _flat, _spec_json
  c = starflow2_qwen7b.get_config("stage=3")
  fae = pretzel_task.fae_of(c)
  vocab = tok_lib.load_tokenizer(c.tokenizer).get_vocab_size(with_added_tokens=True)
  cfg = pconfig.from_config(c, vlm=pconfig.qwen_config(c.vlm), latent_grid=fae.grid,
                            latent_channels=fae.channels, text_vocab=vocab)
  model = pmodel.Pretzel(cfg)
  trees = {"trainable": jax.eval_shape(lambda r: pmodel.init_params(model, r), jax.random.key(0)),
           "vlm": abstract_params(cfg.vlm), "fae": fae.abstract_params(with_stats=True)}
  rules = parallel.logical_rules(c)
  out = {}
  for mesh_name, sizes in STARFLOW2_MESHES.items():
    mesh = jax.sharding.AbstractMesh(sizes, parallel.MESH_AXES)
    out[mesh_name] = {}
    for tree_name, tree in trees.items():
      specs = _flat(parallel.logical_to_specs(tree, mesh, rules))
      shapes = _flat(nn.unbox(tree))
      out[mesh_name][tree_name] = {p: {"shape": list(shapes[p].shape), "spec": _spec_json(s)}
                                   for p, s in specs.items()}
  return out


def test_starflow2_paper_sharding_matches_golden():
  """Regenerate after an intended layout change: PYTHONPATH=$PWD python tests/test_compile.py"""
  import json
  with open(STARFLOW2_GOLDEN) as f:
    golden = json.load(f)
  found = starflow2_layout()
  for mesh_name in STARFLOW2_MESHES:
    for tree in ("trainable", "vlm", "fae"):
      want, got = golden[mesh_name][tree], found[mesh_name][tree]
      assert sorted(got) == sorted(want), (mesh_name, tree, sorted(set(got) ^ set(want))[:10])
      diffs = [f"{p}: golden {want[p]}, found {got[p]}" for p in sorted(got) if got[p] != want[p]]
      assert not diffs, f"{mesh_name}/{tree}: layout changed:\n" + "\n".join(diffs[:20])


if __name__ == "__main__":
  import json
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  with open(STARFLOW2_GOLDEN, "w") as f:
    json.dump(starflow2_layout(), f, indent=1, sort_keys=True)
    f.write("\n")
  print("wrote", STARFLOW2_GOLDEN)
