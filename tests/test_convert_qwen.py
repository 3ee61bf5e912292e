"""The Hugging Face Qwen2.5-VL importer: sharded import onto a (2, 4) mesh with the intended
PartitionSpecs (golden table), and clear errors for bad input."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_qwen  # noqa: E402
from configs import qwen2_5_vl_7b, qwen2_5_vl_tiny  # noqa: E402
from starflow2_jax.convert import hf_qwen2_5_vl as conv  # noqa: E402
from starflow2_jax.vlm import chat  # noqa: E402

# parallel.DEFAULT_LOGICAL_RULES on an (fsdp=2, tensor=4) mesh; one entry per parameter kind
# (decoder layers and vision blocks are stacked on a replicated leading layer axis).
GOLDEN = {
    "embed_tokens/embedding": P("tensor", "fsdp"),
    "layers/stack/norm1/scale": P(None, "fsdp"),
    "layers/stack/norm2/scale": P(None, "fsdp"),
    "layers/stack/attn/q/kernel": P(None, "fsdp", "tensor"),
    "layers/stack/attn/q/bias": P(None, "tensor"),
    "layers/stack/attn/k/kernel": P(None, "fsdp", "tensor"),
    "layers/stack/attn/k/bias": P(None, "tensor"),
    "layers/stack/attn/v/kernel": P(None, "fsdp", "tensor"),
    "layers/stack/attn/v/bias": P(None, "tensor"),
    "layers/stack/attn/out/kernel": P(None, "tensor", "fsdp"),
    "layers/stack/mlp/gate/kernel": P(None, "fsdp", "tensor"),
    "layers/stack/mlp/up/kernel": P(None, "fsdp", "tensor"),
    "layers/stack/mlp/down/kernel": P(None, "tensor", "fsdp"),
    "norm/scale": P("fsdp"),
    "lm_head/kernel": P("fsdp", "tensor"),
    "visual/patch_embed/kernel": P(None, "fsdp"),
    "visual/blocks/norm1/scale": P(None, "fsdp"),
    "visual/blocks/norm2/scale": P(None, "fsdp"),
    "visual/blocks/attn/qkv/kernel": P(None, "fsdp", "tensor"),
    "visual/blocks/attn/qkv/bias": P(None, "tensor"),
    "visual/blocks/attn/out/kernel": P(None, "tensor", "fsdp"),
    "visual/blocks/attn/out/bias": P(None, "fsdp"),
    "visual/blocks/mlp/gate/kernel": P(None, "fsdp", "tensor"),
    "visual/blocks/mlp/gate/bias": P(None, "tensor"),
    "visual/blocks/mlp/up/kernel": P(None, "fsdp", "tensor"),
    "visual/blocks/mlp/up/bias": P(None, "tensor"),
    "visual/blocks/mlp/down/kernel": P(None, "tensor", "fsdp"),
    "visual/blocks/mlp/down/bias": P(None, "fsdp"),
    "visual/ln_q/scale": P("fsdp"),
    "visual/merger_fc1/kernel": P("fsdp", "tensor"),
    "visual/merger_fc1/bias": P("tensor"),
    "visual/merger_fc2/kernel": P("tensor", "fsdp"),
    "visual/merger_fc2/bias": P("fsdp"),
}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  model = hf_qwen.build("gqa_untied", seed=5)
  root = tmp_path_factory.mktemp("hf")
  model.save_pretrained(root / "single")
  model.save_pretrained(root / "two", max_shard_size="500KB")
  model.to(torch.bfloat16).save_pretrained(root / "bf16")
  return root


def _copy(hf_dirs, tmp_path, name="single"):
  return shutil.copytree(hf_dirs / name, tmp_path / name)


def _path(keys):
  return "/".join(k.key for k in keys)


def test_two_shards_onto_2x4_mesh(hf_dirs):
  shards = sorted(f for f in os.listdir(hf_dirs / "two") if f.endswith(".safetensors"))
  assert len(shards) == 2, shards
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  params, _ = conv.load_hf_qwen2_5_vl(str(hf_dirs / "two"), mesh=mesh)
  reference, _ = conv.load_hf_qwen2_5_vl(str(hf_dirs / "single"))
  seen = set()
  for keys, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    kind = _path(keys)
    assert kind in GOLDEN, f"{kind} has no golden PartitionSpec"
    assert x.sharding.spec == GOLDEN[kind], (_path(keys), x.sharding.spec)
    seen.add(kind)
  assert seen == set(GOLDEN)
  for (keys, x), y in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=_path(keys))
  q = params["layers"]["stack"]["attn"]["q"]["kernel"]  # [2, 64, 64] over (-, fsdp=2, tensor=4)
  assert {s.data.shape for s in q.addressable_shards} == {(2, 32, 16)}


def test_missing_shard(hf_dirs, tmp_path):
  d = _copy(hf_dirs, tmp_path, "two")
  victim = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[1]
  os.remove(os.path.join(d, victim))
  with pytest.raises(FileNotFoundError, match=f"missing: {victim}"):
    conv.load_hf_qwen2_5_vl(str(d))


def _edit_config(d, edit):
  path = os.path.join(d, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  edit(cfg)
  with open(path, "w") as f:
    json.dump(cfg, f)


def test_architecture_mismatch(hf_dirs, tmp_path):
  d = _copy(hf_dirs, tmp_path)
  _edit_config(d, lambda c: c.update(model_type="qwen2_vl",
                                     architectures=["Qwen2VLForConditionalGeneration"]))
  with pytest.raises(ValueError, match="expected model_type 'qwen2_5_vl'.*found model_type 'qwen2_vl'"):
    conv.load_hf_qwen2_5_vl(str(d))


def test_config_disagrees_with_tensors(hf_dirs, tmp_path):
  d = _copy(hf_dirs, tmp_path)
  _edit_config(d, lambda c: c["text_config"].update(intermediate_size=96))
  with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.weight: expected shape \(96, 64\)"
                                       r".*found \(128, 64\)"):
    conv.load_hf_qwen2_5_vl(str(d))


def test_tied_config_with_untied_file(hf_dirs, tmp_path):
  d = _copy(hf_dirs, tmp_path)
  _edit_config(d, lambda c: c.update(tie_word_embeddings=True))
  with pytest.raises(ValueError, match="tie_word_embeddings=true, but the file holds lm_head.weight"):
    conv.load_hf_qwen2_5_vl(str(d))


def test_requested_config_mismatch(hf_dirs):
  with pytest.raises(ValueError, match="model.hidden_size: expected 3584, found 64"):
    conv.load_hf_qwen2_5_vl(str(hf_dirs / "single"), expected=qwen2_5_vl_7b.get_config())
  conv.load_hf_qwen2_5_vl(str(hf_dirs / "single"), expected=qwen2_5_vl_tiny.get_config())


def test_dtype_requests(hf_dirs, tmp_path):
  with pytest.raises(ValueError, match="dtype: expected one of .*found 'float16'"):
    conv.load_hf_qwen2_5_vl(str(hf_dirs / "bf16"), dtype="float16")
  out = conv.convert(str(hf_dirs / "bf16"), str(tmp_path / "ck"))
  model, params, config = chat.load_vlm(out, dtype="bfloat16")
  assert config.model.param_dtype == "bfloat16"
  assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"bfloat16"}
  with pytest.raises(ValueError, match="stores bfloat16 parameters, but float32 was requested"):
    chat.load_vlm(out, dtype="float32")
  with pytest.raises(FileExistsError, match="non-empty"):
    conv.convert(str(hf_dirs / "bf16"), out)


def test_sharded_forward_matches_single_device(hf_dirs):
  """The imported model runs sharded (FSDP + tensor parallel from the one rules table, with the
  activation constraints active) and gives the single-device logits."""
  import jax.numpy as jnp
  from starflow2_jax.parallel import sharding_context
  from starflow2_jax.vlm.model import Qwen2_5_VL, QwenConfig
  mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  params, config = conv.load_hf_qwen2_5_vl(str(hf_dirs / "single"), mesh=mesh)
  single, _ = conv.load_hf_qwen2_5_vl(str(hf_dirs / "single"))
  model = Qwen2_5_VL(QwenConfig.from_config(config.model))
  ids = jnp.asarray(np.random.default_rng(0).integers(3, 250, (2, 8)))
  pos = jnp.broadcast_to(jnp.arange(8)[None, :, None], (2, 8, 3))
  fwd = jax.jit(lambda p: model.apply({"params": p}, ids, positions=pos)["logits"])
  with sharding_context(mesh):
    sharded = fwd(params)
  want = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
  assert sharded.sharding.is_equivalent_to(want, 3), sharded.sharding
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(fwd(single)), rtol=0, atol=1e-5)


def test_rules_come_from_the_caller_not_the_checkpoint(hf_dirs, tmp_path):
  """The stored config carries no sharding rules; an older checkpoint's `sharding` section is ignored
  and the parameters follow the caller's mesh and the one rules table."""
  out = conv.convert(str(hf_dirs / "single"), str(tmp_path / "ck"))
  path = os.path.join(out, "config.json")
  with open(path) as f:
    stored = json.load(f)
  assert "sharding" not in stored
  stored["sharding"] = {"logical_rules": [["embed", "tensor"], ["mlp", None]]}  # an older layout
  with open(path, "w") as f:
    json.dump(stored, f)
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  _, params, _ = chat.load_vlm(out, mesh=mesh)
  up = params["layers"]["stack"]["mlp"]["up"]["kernel"]
  assert up.sharding.spec == GOLDEN["layers/stack/mlp/up/kernel"] == P(None, "fsdp", "tensor")
