"""The Pretzel forward (REFERENCE-BEHAVIOURS F 30-34, 40, I 51; STARFLOW2.md 4.4): zero skips keep the
frozen VLM's logits, W_vlm = 0 isolates the flow, the zero-initialised adapter, joint causality in u,
next-position alignment, the whole flow's log-det against slogdet of its Jacobian (float64), packing,
taps, float32 islands, and text-only parity with Hugging Face transformers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pretzel_tiny as pt
from starflow2_jax.flows.block import affine_from_raw
from starflow2_jax.pretzel import model as pmodel

L, I = 48, 2
ROWS = [[[5, ("img", True), 4, ("img", False), 3]],  # text, image, text, image, text
        [[3, ("img", True), 2], [6]]]  # two packed examples


_fwd = pt.forward_fn


@pytest.fixture(scope="module")
def tiny():
  cfg, model, vlm, params, vlm_params = pt.build()
  batch = pt.sequence(ROWS, L, I)
  return cfg, model, vlm, pt.perturbed(params), vlm_params, batch, pt.inputs_of(batch), \
      pt.latents(len(ROWS), I)


def _with(params, **groups):
  return dict(params, **{g: jax.tree.map(jnp.zeros_like, params[g]) for g in groups if groups[g]})


def test_zero_w_d_keeps_the_frozen_vlm_logits(tiny):
  """30: W_D = 0 with random flow, adapter, W_vlm: bit-identical within one call, and equal to a
  separately compiled VLM-only call; a non-zero W_D changes them (the test can fail)."""
  _, _, vlm, params, vp, batch, inputs, x = tiny
  out, alone = _fwd()(_with(params, w_d=True), vp, inputs, x)
  valid = batch["segment_ids"] > 0
  assert np.array_equal(np.asarray(out.logits)[valid], np.asarray(alone)[valid])
  sep = jax.jit(lambda vp, e, i: vlm.apply({"params": vp}, embeds=e, positions=i["positions"],
                                           segment_ids=i["segment_ids"])["logits"])
  emb = np.where(batch["is_image"][..., None], np.asarray(out.vlm_inputs),
                 np.asarray(vlm.apply({"params": vp}, inputs["tokens"], method=vlm.embed)))
  ref = np.asarray(sep(vp, jnp.asarray(emb), inputs))[valid]
  assert np.abs(np.asarray(out.logits)[valid] - ref).max() <= 1e-6 * max(1, np.abs(ref).max())
  out_wd, _ = _fwd()(params, vp, inputs, x)
  assert not np.allclose(np.asarray(out_wd.logits)[valid], np.asarray(alone)[valid])


def test_w_vlm_zero_isolates_the_flow_from_vlm_image_states(tiny):
  """31: with W_vlm = 0 and no taps, another adapter (other VLM states at image positions) leaves the
  deep outputs of an image span and of everything before it bit-identical (text after an image sees
  it through the VLM and P_txt, STARFLOW2.md 4.5); with W_vlm != 0 the image's z changes."""
  _, _, _, params, vp, batch, inputs, x = tiny
  base = _with(params, w_vlm=True)
  other = dict(base, adapter=pt.perturbed(base["adapter"], seed=5))
  a, _ = _fwd()(base, vp, inputs, x)
  b, _ = _fwd()(other, vp, inputs, x)
  assert not np.array_equal(np.asarray(a.vlm_inputs), np.asarray(b.vlm_inputs))
  for row in range(len(ROWS)):
    end = int(np.argmax(batch["tokens"][row] == pt.VEND))  # the first image's <|vision_end|>
    assert np.array_equal(np.asarray(a.y_deep)[row, :end], np.asarray(b.y_deep)[row, :end]), row
    assert np.array_equal(np.asarray(a.z)[row, 0], np.asarray(b.z)[row, 0]), row
  assert not np.array_equal(np.asarray(a.y_deep), np.asarray(b.y_deep))  # text after the image
  c, _ = _fwd()(params, vp, inputs, x)
  d, _ = _fwd()(dict(params, adapter=other["adapter"]), vp, inputs, x)
  assert not np.array_equal(np.asarray(c.z)[:, 0], np.asarray(d.z)[:, 0])


def test_production_init_zero_adapter_and_skips(tiny):
  """32: at production init the VLM input at every image position is exactly 0, and W_vlm, W_D are 0."""
  _, _, _, _, vp, batch, inputs, x = tiny
  _, _, _, params, _ = pt.build()
  for g in ("w_vlm", "w_d"):
    assert not np.any(np.asarray(params[g]["kernel"]))
  out, _ = _fwd()(params, vp, inputs, x)
  assert not np.any(np.asarray(out.vlm_inputs)[batch["is_image"]])
  assert np.any(np.asarray(out.z))


def _prefix_equal(a, b, k):
  for f in ("logits", "y_vlm", "y_deep", "u_seq"):
    assert np.array_equal(np.asarray(getattr(a, f))[:, :k], np.asarray(getattr(b, f))[:, :k]), (f, k)
  for f in ("shift", "scale"):
    assert np.array_equal(np.asarray(getattr(a.theta, f))[:, :k + 1],
                          np.asarray(getattr(b.theta, f))[:, :k + 1]), (f, k)


def test_joint_causality_in_u_and_tokens(tiny):
  """33: perturbing a latent u_k or a text token k leaves every output at positions < k (and the
  Gaussian of position k, which comes from k - 1) bit-identical, and changes outputs from k on."""
  _, _, _, params, vp, batch, inputs, x = tiny
  fwd = _fwd()
  base, _ = fwd(params, vp, inputs, x)
  row = 0
  img_pos = np.nonzero(batch["is_image"][row])[0]
  for k in (img_pos[0], img_pos[7], img_pos[pt.N - 1], img_pos[pt.N]):
    slot, cell = batch["image_slot"][row, k], batch["image_cell"][row, k]
    out, _ = fwd(params, vp, inputs, x, jnp.zeros_like(x).at[row, slot, cell].add(1.0))
    _prefix_equal(out, base, k)
    assert not np.array_equal(np.asarray(out.y_deep)[row, k], np.asarray(base.y_deep)[row, k])
  text_pos = np.nonzero(~batch["is_image"][row] & (batch["tokens"][row] != pt.VSTART))[0]
  for k in (text_pos[2], text_pos[6]):
    tokens = inputs["tokens"].at[row, k].set((batch["tokens"][row, k] + 1) % 200 + 3)
    out, _ = fwd(params, vp, dict(inputs, tokens=tokens), x)
    _prefix_equal(out, base, k)
    assert not np.array_equal(np.asarray(out.logits)[row, k], np.asarray(base.logits)[row, k])


def test_next_position_alignment(tiny):
  """34 (a, b): latent q's Gaussian is softclip(proj_out(y_D)) at q - 1 (the <|vision_start|>
  position for the first latent), which depends on the prompt only."""
  cfg, _, _, params, vp, batch, inputs, x = tiny
  out, _ = _fwd()(params, vp, inputs, x)
  head = params["deep"]["proj_out"]
  raw = jnp.dot(out.y_deep, head["kernel"], precision=jax.lax.Precision.HIGHEST) + head["bias"]
  want = affine_from_raw(raw, "starflow", cfg.soft_clip)
  img = batch["is_image"]
  prev = np.roll(img, -1, axis=1)  # positions whose next position is a latent
  assert np.all(batch["tokens"][prev & ~img] == pt.VSTART)
  for f in ("shift", "scale"):
    np.testing.assert_allclose(np.asarray(getattr(out.theta, f))[img], np.asarray(getattr(want, f))[prev],
                               rtol=1e-6, atol=1e-6)
  other, _ = _fwd()(params, vp, inputs, pt.latents(len(ROWS), I, seed=9))
  first = img & ~np.roll(img, 1, axis=1) & (batch["image_slot"] == 0)  # the first span of a row
  for f in ("shift", "scale"):
    assert np.array_equal(np.asarray(getattr(out.theta, f))[first],
                          np.asarray(getattr(other.theta, f))[first])
  u = np.asarray(out.theta.shift + out.theta.scale * _seq(out.z, batch))
  np.testing.assert_allclose(u[img], np.asarray(out.u_seq)[img], rtol=1e-5, atol=1e-5)


def _seq(per_image, batch):
  """[B, I, N, D] -> [B, L, D] at image positions (zeros elsewhere)."""
  p = np.asarray(per_image)
  rows = np.arange(p.shape[0])[:, None]
  out = p[rows, np.maximum(batch["image_slot"], 0), np.maximum(batch["image_cell"], 0)]
  return np.where(batch["is_image"][..., None], out, 0.0)


def test_understanding_and_generation_paths_see_the_same_latents(tiny):
  """The VLM input at an image position is A(u) and the deep flow models the same u there: the shallow
  output of that image and cell, whether the image is a flow target or an understanding input."""
  _, model, _, params, vp, batch, inputs, x = tiny
  out, _ = _fwd()(params, vp, inputs, x)
  img = batch["is_image"]
  u_img = _seq(out.u, batch)
  assert np.array_equal(np.asarray(out.u_seq)[img], u_img[img])
  a = model.apply({"params": params}, jnp.asarray(u_img), method=pmodel.Pretzel.adapt)
  np.testing.assert_allclose(np.asarray(out.vlm_inputs)[img], np.asarray(a)[img], rtol=1e-6, atol=1e-6)
  assert not batch["image_flow_loss"][0, 1] and batch["image_valid"][0, 1]  # an understanding input
  z = np.asarray(out.z)
  back = np.asarray(out.theta.shift) + np.asarray(out.theta.scale) * _seq(z, batch)
  np.testing.assert_allclose(back[img], u_img[img], rtol=1e-5, atol=1e-5)


def test_packed_examples_equal_separate_rows(tiny):
  """Attention stays inside a packed example: two examples packed in one row give the outputs each
  gives alone in its own row."""
  _, _, _, params, vp, _, _, x = tiny
  first, second = [3, ("img", True), 2], [6]
  packed = pt.sequence([[first, second], [[5]]], L, I)
  alone = pt.sequence([[first], [second]], L, I)
  a, _ = _fwd()(params, vp, pt.inputs_of(packed), x)
  b, _ = _fwd()(params, vp, pt.inputs_of(alone), x)
  n0, n1 = int(np.sum(alone["segment_ids"][0] > 0)), int(np.sum(alone["segment_ids"][1] > 0))
  assert np.array_equal(packed["tokens"][0, :n0 + n1],
                        np.concatenate([alone["tokens"][0, :n0], alone["tokens"][1, :n1]]))
  tol = dict(rtol=2e-5, atol=2e-5)
  for f in ("logits", "y_deep"):
    pa, pb = np.asarray(getattr(a, f)), np.asarray(getattr(b, f))
    np.testing.assert_allclose(pa[0, :n0], pb[0, :n0], **tol)
    np.testing.assert_allclose(pa[0, n0:n0 + n1], pb[1, :n1], **tol)
  np.testing.assert_allclose(np.asarray(a.z)[0, 0], np.asarray(b.z)[0, 0], **tol)


def test_logdet_of_the_whole_flow_matches_slogdet_float64(x64):
  """Shallow + deep log-dets summed over the image equal log|det dz/dx| of the Jacobian (float64)."""
  _, model, vlm = pt.model_of(param_dtype="float64", dtype="float64")
  base, vp = pt.build()[3], pt.build()[4]
  params, vp = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (pt.perturbed(base, scale=0.2), vp))
  batch = pt.sequence([[[4, ("img", True), 2]]], 24, 1)
  inputs = pt.inputs_of(batch)
  x = pt.latents(1, 1, dtype=jnp.float64)

  @jax.jit
  def jac_and_out(xf):
    z_of = lambda v: pmodel.forward(model, params, vlm, vp, inputs, v.reshape(x.shape), "nf")  # noqa
    return jax.jacfwd(lambda v: z_of(v).z.reshape(-1))(xf), z_of(xf)

  jac, out = jac_and_out(x.reshape(-1))
  sign, logdet = np.linalg.slogdet(np.asarray(jac))
  total = float(jnp.sum(out.deep_logdet) + sum(jnp.sum(ld) for ld in out.shallow_logdets))
  assert sign != 0 and abs(logdet - total) <= 1e-10 * max(1.0, abs(total)), (logdet, total)
  assert abs(float(jnp.sum(out.deep_logdet))) > 1e-3  # the deep block contributes


def test_zero_taps_are_a_noop_and_taps_read_vlm_layers(tiny):
  """40: zero-initialised taps give bit-identical outputs to a model without taps; a non-zero tap
  (VLM layer 1 -> before deep layer 2) changes the deep stream."""
  _, _, _, params, vp, _, inputs, x = tiny
  taps = ((1, 2), (2, 1))
  cfg = pt.model_of(skip_taps=taps)[0]
  zero = {f"tap_{k}": {"kernel": jnp.zeros((cfg.vlm_width, cfg.width))} for k in range(len(taps))}
  with_taps = dict(params, taps=zero)
  a, _ = _fwd()(params, vp, inputs, x)
  b, _ = _fwd("full", skip_taps=taps)(with_taps, vp, inputs, x)
  for f in ("logits", "y_deep", "z"):
    assert np.array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f))), f
  c, _ = _fwd("full", skip_taps=taps)(dict(with_taps, taps=pt.perturbed(zero)), vp, inputs, x)
  assert not np.allclose(np.asarray(a.y_deep), np.asarray(c.y_deep))


def test_float32_islands_with_bfloat16_trunk(tiny):
  """51: with the flow trunk in bfloat16 the Gaussians, z, log-dets and logits are float32."""
  _, _, _, params, vp, _, inputs, x = tiny
  cfg, model, vlm = pt.model_of(dtype="bfloat16")
  out = jax.eval_shape(lambda p: pmodel.forward(model, p, vlm, vp, inputs, x), params)
  for f in ("logits", "z", "deep_logdet", "u"):
    assert getattr(out, f).dtype == jnp.float32, f
  assert out.theta.scale.dtype == out.theta.shift.dtype == jnp.float32
  assert all(ld.dtype == jnp.float32 for ld in out.shallow_logdets)
  assert out.y_deep.dtype == jnp.float32  # the final norm is a float32 island


def test_latent_tokens_of_the_wrong_shape_are_rejected(tiny):
  _, model, vlm, params, vp, _, inputs, _ = tiny
  with pytest.raises(ValueError, match=r"latent tokens x: expected shape \[2, \*, 16, 4\]"):
    pmodel.forward(model, params, vlm, vp, inputs, jnp.zeros((2, I, 9, 4)))


def test_text_only_logits_equal_transformers(tmp_path):
  """52 through the Pretzel: a tiny random Qwen2.5-VL from transformers, imported by our converter;
  the Pretzel text logits of a text-only prompt (zero W_D, the production init) equal HF's."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  import hf_qwen
  from starflow2_jax.convert.hf_qwen2_5_vl import load_hf_qwen2_5_vl
  hf = hf_qwen.build("gqa_untied", seed=3)
  hf.save_pretrained(tmp_path)
  vp, _ = load_hf_qwen2_5_vl(str(tmp_path))
  vp = {k: v for k, v in vp.items() if k != "visual"}
  _, _, _, params, _ = pt.build()
  batch = pt.sequence([[[L]], [[L - 7]]], L, I)
  out, _ = _fwd()(params, vp, pt.inputs_of(batch), pt.latents(2, I))
  with torch.no_grad():
    ref = hf(input_ids=torch.as_tensor(batch["tokens"][:1].astype(np.int64))).logits.numpy()
  err = np.abs(np.asarray(out.logits)[:1] - ref).max()
  assert err <= 1e-5 * max(1.0, np.abs(ref).max()), err


def test_running_positions_restart_per_packed_example():
  """deep_rope = "1d": the position of a token inside its packed example."""
  seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
  got = np.asarray(pmodel.running_positions(seg))
  assert got.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]


def test_image_pos_table_adds_the_row_of_each_latents_grid_cell(tiny):
  """model.image_pos_table: the cell read from a latent's M-RoPE ids (s, s + r, s + c) is its raster
  cell r W + c in every image span (packed examples included); without the option there is no table.
  Changing row k changes the deep stream first at the latents of cell k: positions before the first of
  them are bit-identical."""
  cfg, model, _, params, vp, batch, inputs, x = tiny
  assert "image_pos" not in params["deep"]
  tcfg, _, _, tparams, _ = pt.build(image_pos_table=True)
  table = tparams["deep"]["image_pos"]
  assert table.shape == (pt.N, tcfg.width)
  cells = np.asarray(pmodel.grid_cells(inputs["positions"], tcfg.token_grid))
  img = batch["is_image"]
  assert (cells[img] == batch["image_cell"][img]).all()
  tparams = pt.perturbed(tparams)
  k = 5
  bumped = dict(tparams, deep=dict(tparams["deep"], image_pos=tparams["deep"]["image_pos"].at[k].add(1.0)))
  a, _ = _fwd("full", image_pos_table=True)(tparams, vp, inputs, x)
  b, _ = _fwd("full", image_pos_table=True)(bumped, vp, inputs, x)
  ya, yb = np.asarray(a.y_deep), np.asarray(b.y_deep)
  for r in range(len(ROWS)):
    hit = np.nonzero(img[r] & (batch["image_cell"][r] == k))[0]
    first = hit[0]
    assert np.array_equal(ya[r, :first], yb[r, :first])
    assert not np.allclose(ya[r, first], yb[r, first])
