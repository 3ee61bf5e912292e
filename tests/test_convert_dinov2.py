"""DINOv2 parity with transformers.Dinov2Model (REFERENCE-BEHAVIOURS 53) through the hf_dinov2 importer:
tiny random SwiGLU and GELU-MLP models saved as safetensors (one and two shards, Hub and transformers-5
names), converted, compared on every hidden state at the native size and at interpolated (non-square)
sizes; the import onto a (2, 4) mesh; clear errors for mismatched or foreign files."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from starflow2_jax import ckpt  # noqa: E402
from starflow2_jax.convert import hf_dinov2  # noqa: E402
from starflow2_jax.errors import UserError  # noqa: E402
from starflow2_jax.fae import dinov2 as dinov2_lib  # noqa: E402

VARIANTS = {  # hidden 48, 3 heads of 16, 2 layers, 56-px table (4 x 4 patches of 14)
    "swiglu": dict(use_swiglu_ffn=True),
    "gelu": dict(use_swiglu_ffn=False),
}
# (H, W) inputs: the native size (no interpolation) and non-native, non-square ones (bicubic resize)
SIZES = {"swiglu": [(56, 56), (42, 70)], "gelu": [(56, 56), (70, 28)]}
TOL = 1e-5  # relative to scale: max|a - b| <= TOL * max(1, max|b|)


def build_hf(variant: str, seed: int = 0):
  """A tiny random Dinov2Model; every parameter randomised (LayerScale and norm weights 1 + noise)."""
  torch.manual_seed(seed)
  cfg = transformers.Dinov2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                  image_size=56, patch_size=14, layerscale_value=0.5,
                                  attn_implementation="eager", **VARIANTS[variant])
  model = transformers.Dinov2Model(cfg).eval()
  rng = np.random.default_rng(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.from_numpy(rng.normal(0.0, 0.1, tuple(p.shape)).astype(np.float32))
      p.copy_(1.0 + noise if ("norm" in name or "lambda1" in name) else noise * 3 if "embeddings" in
              name else noise)
  return model


def hf_forward(model, pixels: np.ndarray):
  """pixels [B, H, W, 3] -> (last_hidden_state, hidden states after each layer) as numpy."""
  with torch.no_grad():
    out = model(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()), output_hidden_states=True)
  return out.last_hidden_state.numpy(), [h.numpy() for h in out.hidden_states[1:]]


def close(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape
  err = np.max(np.abs(a - b))
  assert err <= TOL * max(1.0, np.max(np.abs(b))), err


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf_dinov2")
  models = {}
  for variant in VARIANTS:
    models[variant] = model = build_hf(variant, seed=len(models))
    model.save_pretrained(root / variant)
  models["swiglu"].save_pretrained(root / "two", max_shard_size="200KB")
  # transformers 5's in-memory names (split SwiGLU, q_proj ...), as a plain state_dict file
  from safetensors.torch import save_file
  os.makedirs(root / "memory_names")
  shutil.copy(root / "swiglu" / "config.json", root / "memory_names" / "config.json")
  save_file({k: v.contiguous() for k, v in models["swiglu"].state_dict().items()},
            str(root / "memory_names" / "model.safetensors"))
  return root, models


@pytest.fixture(scope="module")
def forward():
  """One jitted forward per config (the model is static)."""
  cache = {}

  def run(cfg, params, pixels):
    if cfg not in cache:
      model = dinov2_lib.Dinov2(cfg)
      cache[cfg] = jax.jit(lambda p, x: model.apply({"params": p}, x, collect_hidden=True))
    last, hidden = cache[cfg](params, pixels)
    return np.asarray(last), np.asarray(hidden)

  return run


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parity_native_and_interpolated(hf_dirs, forward, variant):
  root, models = hf_dirs
  rng = np.random.default_rng(7)
  for hw in SIZES[variant]:
    params, config = hf_dinov2.load_hf_dinov2(str(root / variant), input_size=hw)
    cfg = dinov2_lib.Dinov2Config.from_config(config.model)
    assert cfg.input_hw == hw and cfg.mlp == variant
    pixels = rng.normal(size=(2, *hw, 3)).astype(np.float32)
    last, hidden = forward(cfg, params, pixels)
    want_last, want_hidden = hf_forward(models[variant], pixels)
    close(last, want_last)
    assert len(hidden) == len(want_hidden)
    for ours, theirs in zip(hidden, want_hidden):
      close(ours, theirs)


def test_two_shards_and_memory_names_onto_2x4_mesh(hf_dirs, forward):
  root, models = hf_dirs
  shards = sorted(f for f in os.listdir(root / "two") if f.endswith(".safetensors"))
  assert len(shards) == 2, shards
  mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  single, _ = hf_dinov2.load_hf_dinov2(str(root / "swiglu"))
  for name in ("two", "memory_names"):
    params, config = hf_dinov2.load_hf_dinov2(str(root / name), mesh=mesh)
    golden = {  # parallel.DEFAULT_LOGICAL_RULES on (fsdp=2, tensor=4)
        "layers/stack/attn/q/kernel": P(None, "fsdp", "tensor"),
        "layers/stack/mlp/gate/kernel": P(None, "fsdp", "tensor"),
        "layers/stack/mlp/down/kernel": P(None, "tensor", "fsdp"),
        "layers/stack/ls1/scale": P(None, "fsdp"),
        "patch_embed/kernel": P(None, "fsdp"),
        "pos_embed": P(None, "fsdp"),
    }
    flat = {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for key, spec in golden.items():
      assert flat[key].sharding.spec == spec, (name, key, flat[key].sharding.spec)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, single)
  cfg = dinov2_lib.Dinov2Config.from_config(config.model)
  pixels = np.random.default_rng(8).normal(size=(1, 56, 56, 3)).astype(np.float32)
  close(forward(cfg, params, pixels)[0], hf_forward(models["swiglu"], pixels)[0])


def test_convert_writes_a_checkpoint_load_dinov2_reads(hf_dirs, forward, tmp_path):
  root, models = hf_dirs
  out = hf_dinov2.convert(str(root / "gelu"), str(tmp_path / "ckpt"), input_size=(70, 28))
  model, params, cfg = dinov2_lib.load_dinov2(out)
  assert cfg.input_hw == (70, 28) and json.load(open(os.path.join(out, "meta.json")))["source"] == "hf_dinov2"
  pixels = np.random.default_rng(9).normal(size=(1, 70, 28, 3)).astype(np.float32)
  close(forward(cfg, params, pixels)[0], hf_forward(models["gelu"], pixels)[0])
  with pytest.raises(FileExistsError):
    hf_dinov2.convert(str(root / "gelu"), out)
  stored = json.load(open(os.path.join(out, "config.json")))  # a checkpoint unlike its config
  stored["model"]["num_layers"] = 3
  json.dump(stored, open(os.path.join(out, "config.json"), "w"))
  with pytest.raises(UserError, match=r"layers.*stack.*expected \(3, .*found \(2, "):
    dinov2_lib.load_dinov2(out)


def _edited(root, tmp_path, variant, **changes):
  d = shutil.copytree(root / variant, tmp_path / f"{variant}_edited")
  cfg = json.load(open(d / "config.json"))
  cfg.update(changes)
  json.dump(cfg, open(d / "config.json", "w"))
  return str(d)


def test_errors(hf_dirs, tmp_path):
  root, _ = hf_dirs
  with pytest.raises(UserError, match=r"embeddings.cls_token: expected shape \(1, 1, 64\) from "
                                      r"config.json .*found \(1, 1, 48\)"):
    hf_dinov2.load_hf_dinov2(_edited(root, tmp_path, "gelu", hidden_size=64, num_attention_heads=4))
  with pytest.raises(UserError, match=r"not consumed.*encoder\.layer\.1\."):
    hf_dinov2.load_hf_dinov2(_edited(root, tmp_path / "l", "swiglu", num_hidden_layers=1))
  with pytest.raises(UserError, match="model_type 'dinov2'.*found model_type 'qwen2_5_vl'"):
    hf_dinov2.load_hf_dinov2(_edited(root, tmp_path / "q", "gelu", model_type="qwen2_5_vl"))
  with pytest.raises(UserError, match=r"dinov2.num_layers: expected 3, found 2"):
    want = dinov2_lib.Dinov2Config(hidden_size=48, num_layers=3, num_heads=3, image_size=56)
    hf_dinov2.load_hf_dinov2(str(root / "gelu"), expected=want)
  params, config = hf_dinov2.load_hf_dinov2(str(root / "gelu"))
  cfg = dinov2_lib.Dinov2Config.from_config(config.model)
  with pytest.raises(UserError, match=r"expected \[B, 56, 56, 3\].*found \[1, 42, 56, 3\]"):
    dinov2_lib.Dinov2(cfg).apply({"params": params}, np.zeros((1, 42, 56, 3), np.float32))
