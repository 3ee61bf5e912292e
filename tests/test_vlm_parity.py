"""Property 52: our Qwen2.5-VL, imported by our converter, matches Hugging Face transformers.

Tiny random models are built in transformers on the fly (tests/hf_qwen.py) and saved with
save_pretrained; logits and every hidden state must agree to 1e-5 (float32)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import hf_qwen  # noqa: E402
from starflow2_jax.convert.hf_qwen2_5_vl import load_hf_qwen2_5_vl  # noqa: E402
from starflow2_jax.vlm.model import Qwen2_5_VL, QwenConfig  # noqa: E402
from starflow2_jax.vlm.positions import mrope_positions  # noqa: E402

TOL = 1e-5
IMAGE, VSTART, VEND = 250, 252, 253
GRIDS = [(1, 4, 6), (1, 6, 10)]  # two images; 6x10 patches = 3x5 merged cells, not a multiple of the
# 2x2-cell window, so windows are ragged


def _lm(model, params, **inputs):
  """The language model under one jit (op-by-op dispatch is slow on CPU), all hidden states."""
  return jax.jit(lambda p, x: model.apply({"params": p}, **x, collect_hidden=True))(params, inputs)


def _vision(model, params, pix, grids):
  return jax.jit(lambda p, x: model.apply({"params": p}, x, tuple(grids),
                                          method=Qwen2_5_VL.encode_images))(params, pix)


def _close(ours, theirs, what):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  err = np.abs(ours - theirs).max()
  assert err <= TOL * max(1.0, np.abs(theirs).max()), f"{what}: max abs difference {err}"


@pytest.fixture(scope="module", params=list(hf_qwen.VARIANTS))
def pair(request, tmp_path_factory):
  """(variant, HF model, our model, imported params, HF directory), built once per variant."""
  hf = hf_qwen.build(request.param, seed=len(request.param))
  d = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(d)
  params, config = load_hf_qwen2_5_vl(str(d))
  return request.param, hf, Qwen2_5_VL(QwenConfig.from_config(config.model)), params, d


def test_text_only_right_padded(pair):
  """(a)/(c): text-only batch, right padding + attention mask: logits and all L+1 hidden states."""
  _, hf, model, params, _ = pair
  rng = np.random.default_rng(1)
  ids = rng.integers(3, 250, (2, 10))
  mask = np.ones((2, 10), bool)
  mask[1, 6:] = False
  pos, _ = mrope_positions(ids, mask, [], IMAGE)
  out = _lm(model, params, tokens=jnp.asarray(ids), positions=jnp.asarray(pos),
            valid=jnp.asarray(mask))
  with torch.no_grad():
    ref = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask.astype(np.int64)),
             output_hidden_states=True)
  assert len(out["hidden_states"]) == len(ref.hidden_states) == 3
  for i, (a, b) in enumerate(zip(out["hidden_states"], ref.hidden_states)):
    _close(np.asarray(a)[mask], b.numpy()[mask], f"hidden_states[{i}]")
  _close(np.asarray(out["hidden"])[mask], ref.hidden_states[-1].numpy()[mask], "final hidden")
  _close(np.asarray(out["logits"])[mask], ref.logits.numpy()[mask], "logits")


def _two_image_prompt(rng):
  spans = [np.r_[VSTART, [IMAGE] * (h // 2 * w // 2), VEND] for _, h, w in GRIDS]
  return np.concatenate([rng.integers(3, 250, 4), spans[0], rng.integers(3, 250, 3), spans[1],
                         rng.integers(3, 250, 5)])[None]


def test_two_images_of_different_sizes(pair):
  """Vision tower (window + full attention, ragged windows) and the LM on a prompt holding two
  images, HF computing its own M-RoPE positions from mm_token_type_ids."""
  _, hf, model, params, _ = pair
  rng = np.random.default_rng(2)
  ids = _two_image_prompt(rng)
  pix = rng.normal(size=(sum(t * h * w for t, h, w in GRIDS), 3 * 2 * 14 * 14)).astype(np.float32)
  feats = _vision(model, params, jnp.asarray(pix), GRIDS)
  with torch.no_grad():
    ref_feats = torch.cat(hf.model.get_image_features(
        torch.as_tensor(pix), torch.as_tensor(GRIDS)).pooler_output).numpy()
    ref = hf(input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(pix),
             image_grid_thw=torch.as_tensor(GRIDS),
             mm_token_type_ids=torch.as_tensor(ids == IMAGE).int(),
             attention_mask=torch.ones(ids.shape, dtype=torch.long), output_hidden_states=True)
  _close(feats, ref_feats, "vision tower output")
  is_img = ids == IMAGE
  index = np.where(is_img, np.cumsum(is_img) - 1, -1)
  pos, _ = mrope_positions(ids, None, [(h // 2, w // 2) for _, h, w in GRIDS], IMAGE)
  out = _lm(model, params, tokens=jnp.asarray(ids), positions=jnp.asarray(pos), image_embeds=feats,
            image_index=jnp.asarray(index))
  for i, (a, b) in enumerate(zip(out["hidden_states"], ref.hidden_states)):
    _close(a, b.numpy(), f"hidden_states[{i}]")
  _close(out["logits"], ref.logits.numpy(), "logits")


def test_embeds_at_latent_positions_with_our_positions(pair):
  """(b): arbitrary vectors at an image span via inputs_embeds, explicit M-RoPE ids from our builder."""
  _, hf, model, params, _ = pair
  rng = np.random.default_rng(3)
  ids = np.r_[rng.integers(3, 250, 3), VSTART, [IMAGE] * 6, VEND, rng.integers(3, 250, 4)][None]
  pos, _ = mrope_positions(ids, None, [(3, 2)], IMAGE)
  emb = np.array(model.apply({"params": params}, jnp.asarray(ids), method=Qwen2_5_VL.embed))
  emb[ids == IMAGE] = rng.normal(size=(6, emb.shape[-1]))
  out = _lm(model, params, embeds=jnp.asarray(emb), positions=jnp.asarray(pos))
  with torch.no_grad():
    ref = hf(inputs_embeds=torch.as_tensor(emb), position_ids=torch.as_tensor(pos.transpose(2, 0, 1)),
             attention_mask=torch.ones(ids.shape, dtype=torch.long))
  _close(out["logits"], ref.logits.numpy(), "logits")


@pytest.mark.parametrize("pair", ["gqa_untied"], indirect=True)
def test_sharded_and_bf16_files(pair, tmp_path):
  """(d): the sharded index loads to the same parameters; a bf16 file matches HF run on the same
  bf16-rounded weights in float32, and keeps bf16 when no dtype is requested."""
  name, hf, model, params, _ = pair
  hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
  sharded, _ = load_hf_qwen2_5_vl(str(tmp_path / "sharded"))
  for a, b in zip(jax_leaves(sharded), jax_leaves(params)):
    np.testing.assert_array_equal(a, b)
  hf16 = hf_qwen.build(name, seed=len(name)).to(torch.bfloat16)
  hf16.save_pretrained(tmp_path / "bf16")
  p16, cfg16 = load_hf_qwen2_5_vl(str(tmp_path / "bf16"))
  assert cfg16.model.param_dtype == "bfloat16"
  assert {str(x.dtype) for x in jax.tree.leaves(p16)} == {"bfloat16"}
  p32, _ = load_hf_qwen2_5_vl(str(tmp_path / "bf16"), dtype="float32")
  ids = np.random.default_rng(4).integers(3, 250, (1, 9))
  pos, _ = mrope_positions(ids, None, [], IMAGE)
  out = _lm(model, p32, tokens=jnp.asarray(ids), positions=jnp.asarray(pos))
  ref_model = hf_qwen.build(name, seed=len(name))  # f32 buffers (rotary tables), bf16-rounded weights
  with torch.no_grad():
    for p in ref_model.parameters():
      p.copy_(p.to(torch.bfloat16).float())
    ref = ref_model(input_ids=torch.as_tensor(ids))
  _close(out["logits"], ref.logits.numpy(), "logits (bf16 weights)")


def jax_leaves(tree):
  return [np.asarray(x, np.float32) for x in jax.tree.leaves(tree)]
