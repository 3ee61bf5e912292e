"""Properties 4 and 5: M-RoPE position ids (our get_rope_index port) and RoPE at cache positions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from starflow2_jax.vlm.model import Qwen2_5_VL, QwenConfig
from starflow2_jax.vlm.positions import mrope_positions

IMAGE, VSTART, VEND = 250, 252, 253


def _span(h, w):
  return [VSTART] + [IMAGE] * (h * w) + [VEND]


def _batch(rows, left_pad=True):
  length = max(len(r) for r in rows)
  ids = np.zeros((len(rows), length), np.int64)
  valid = np.zeros((len(rows), length), bool)
  for i, r in enumerate(rows):
    sl = slice(length - len(r), length) if left_pad else slice(0, len(r))
    ids[i, sl] = r
    valid[i, sl] = True
  return ids, valid


def test_text_after_image_resumes_at_s_plus_max_side():
  ids = np.array([[5, 6, *_span(2, 3), 7]])
  pos, nxt = mrope_positions(ids, None, [(2, 3)], IMAGE)
  s = 3  # 5, 6, <|vision_start|> take 0, 1, 2
  latents = pos[0, 3:9]
  np.testing.assert_array_equal(latents[:, 0], [s] * 6)
  np.testing.assert_array_equal(latents[:, 1], s + np.array([0, 0, 0, 1, 1, 1]))
  np.testing.assert_array_equal(latents[:, 2], s + np.array([0, 1, 2, 0, 1, 2]))
  np.testing.assert_array_equal(pos[0, 9], [s + 3] * 3)  # <|vision_end|> at s + max(2, 3)
  np.testing.assert_array_equal(pos[0, 10], [s + 4] * 3)
  assert nxt[0] == s + 5


def test_1d_option():
  ids = np.array([[5, *_span(2, 3), 7]])
  pos, nxt = mrope_positions(ids, None, [(2, 3)], IMAGE, mode="1d")
  np.testing.assert_array_equal(pos[0, :, 0], np.arange(ids.shape[1]))
  assert (pos[0] == pos[0, :, :1]).all() and nxt[0] == ids.shape[1]


def test_bad_grids_are_named():
  ids = np.array([[5, *_span(2, 3), 7]])
  with pytest.raises(ValueError, match="has 6 image tokens, but its grid 2x2 needs 4"):
    mrope_positions(ids, None, [(2, 2)], IMAGE)
  with pytest.raises(ValueError, match="2 image grid"):
    mrope_positions(ids, None, [(2, 3), (1, 1)], IMAGE)


def test_matches_hf_get_rope_index():
  """0, 1 and 2 image spans, non-square grids, left padding: bit-identical to Hugging Face."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import hf_qwen
  hf = hf_qwen.build("gqa_untied")
  rows = [[5, 6, 7, 8, 9],
          [5, *_span(2, 3), 6, 7],
          [5, *_span(3, 1), 6, *_span(2, 4), 8]]
  grids = [(2, 3), (3, 1), (2, 4)]
  ids, valid = _batch(rows)
  ours, nxt = mrope_positions(ids, valid, grids, IMAGE)
  theirs = hf_qwen.hf_positions(hf, ids, valid.astype(np.int64), [(1, 2 * h, 2 * w) for h, w in grids])
  np.testing.assert_array_equal(ours.transpose(2, 0, 1), theirs)
  np.testing.assert_array_equal(nxt, ours.max(axis=(1, 2)) + 1)


def test_rope_at_cache_positions(x64):
  """Prefill k tokens of an image prompt, decode the rest one at a time: the cached path applies the
  same rotations as the full forward (float64, 1e-12 on the hidden states)."""
  cfg = QwenConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                   num_kv_heads=2, mrope_section=(2, 3, 3), dtype="float64", param_dtype="float64")
  model = Qwen2_5_VL(cfg)
  ids = np.array([[5, 6, *_span(2, 3), 7, 8, 9]])
  pos, _ = mrope_positions(ids, None, [(2, 3)], IMAGE)
  ids, pos = jnp.asarray(ids), jnp.asarray(pos)
  fwd = lambda p, ids, pos, cache: model.apply({"params": p}, ids, positions=pos, cache=cache)

  def init_and_full():  # one compile for the random parameters and the full forward
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape, p.dtype),
                          model.init(jax.random.key(0), ids, positions=pos)["params"])
    return params, fwd(params, ids, pos, None)["hidden"]

  params, full = jax.jit(init_and_full)()
  fwd = jax.jit(fwd)
  cache = cfg.init_cache(1, 16)
  outs = []
  for lo, hi in [(0, 4)] + [(t, t + 1) for t in range(4, ids.shape[1])]:
    out = fwd(params, ids[:, lo:hi], pos[:, lo:hi], cache)
    outs.append(out["hidden"])
    cache = out["cache"]
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=0, atol=1e-12)
