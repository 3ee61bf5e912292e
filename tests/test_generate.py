"""STARFlow2 generation (issue 10; REFERENCE-BEHAVIOURS.md 21, 22, 26, 34, 36-38): the cached loop over
both streams equals the teacher-forced Pretzel forward on the generated sequence, guidance, Jacobi,
shallow inversion, text decoding at the start of stage 3, and bad input.

One tiny Pretzel (tests/pretzel_tiny.py, every weight random, skips, adapter and the image position
table of `model.image_pos_table` included: the loop must give each latent its grid cell). The
compiled generators are shared at module scope: one unguided (interleaved, two images), one guided
(text-to-image, the weight traced so w = 0 and w > 0 share it), one Jacobi.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pretzel_tiny as pt
from starflow2_jax.errors import UserError
from starflow2_jax.flows.block import Affine, affine_from_raw
from starflow2_jax.flows.guidance import Guidance
from starflow2_jax.flows.sampling import Jacobi
from starflow2_jax.generate import decode, loop, prompts
from starflow2_jax.pretzel import loss as ploss, model as pmodel
from starflow2_jax.pretzel.tokens import SpecialTokens
from starflow2_jax.vlm import generate as vlm_generate
from starflow2_jax.vlm.positions import mrope_positions

SP = SpecialTokens(im_start=248, im_end=249, vision_start=pt.VSTART, vision_end=pt.VEND,
                   image_pad=pt.IMAGE, pad=pt.PAD, eos=251)
M = 2 * (pt.N + 1) + 6  # text, image, 3 text tokens, forced <|vision_start|>, image, text
SECOND = pt.N + 1 + 3  # the output column where the second image is requested
LENS = (5, 9)
KEY = jax.random.key(7)


def tol(a, b, rel=1e-5):
  a, b = np.asarray(a), np.asarray(b)
  return np.max(np.abs(a - b)) <= rel * max(1.0, float(np.max(np.abs(b))))


@functools.lru_cache(maxsize=None)
def tiny():
  cfg, model, vlm, params, vparams = pt.build(image_pos_table=True)
  return cfg, model, vlm, pt.perturbed(params), vparams


def _prompt(lens, last, seed=0, null=False):
  """Left-padded hand-built prompts: random text (shorter for null prompts), then `last`."""
  rng = np.random.default_rng(seed)
  width = max(lens)
  toks = np.zeros((len(lens), width), np.int32)
  valid = np.zeros((len(lens), width), bool)
  for r, n in enumerate(lens):
    n = 2 if null else n
    toks[r, width - n:] = rng.integers(3, 240, n)
    toks[r, -1] = last
    valid[r, width - n:] = True
  pos, nxt = mrope_positions(toks, valid, [], pt.IMAGE)
  return dict(tokens=toks, valid=valid, positions=pos, is_image=np.zeros_like(valid),
              image_slot=np.full_like(toks, -1), image_cell=np.full_like(toks, -1), next_position=nxt)


def _concat(*ps):
  return {k: np.concatenate([p[k] for p in ps]) for k in ps[0]}


def _run(gcfg, prompt, forced, weight=None):
  cfg, model, vlm, params, vparams = tiny()
  p = prompts.with_input_latents(prompt, cfg.token_dim)
  p["forced"] = jnp.asarray(forced)
  return jax.device_get(loop.jitted_generate(model, vlm, gcfg, params, vparams, p, KEY,
                                             len(forced), True, weight))


def _forced(b):
  f = np.full((b, M), -1, np.int32)
  f[:, SECOND] = SP.vision_start
  return f


GEN = loop.GenerateConfig(specials=SP, max_new_tokens=M, max_images=2)


@pytest.fixture(scope="module")
def interleaved():
  prompt = _prompt(LENS, SP.vision_start)
  return prompt, _run(GEN, prompt, _forced(len(LENS)))


@functools.lru_cache(maxsize=None)
def _forward():
  return jax.jit(functools.partial(pmodel.forward_from_u, tiny()[1]), static_argnums=(1,))


def _teacher(prompt, res, rows: int = 2 * len(LENS)):
  """The teacher-forced forward on the generated sequence, its prompt rows repeated to `rows` (one
  compiled forward for the unguided and the guided runs); the outputs of the prompt's rows."""
  cfg, model, vlm, params, vparams = tiny()
  n = prompt["tokens"].shape[0]
  reps = rows // n
  inputs, u = prompts.full_sequence(_concat(*[prompt] * reps),
                                    dict(res, positions=np.concatenate([res["positions"]] * reps)))
  return jax.tree.map(lambda a: a[:n], _forward()(params, vlm, vparams, inputs, u))


def test_interleaved_incremental_equals_teacher_forcing(interleaved):
  """Property 37 (a, b) and 34 (c): prompt -> image -> text -> image -> text. The logits at every
  generated text position and the deep Gaussians at every latent equal the teacher-forced forward;
  z = (u - mu) / sigma is the step's noise; N latents, then the forced <|vision_end|>, twice."""
  prompt, res = interleaved
  cfg = tiny()[0]
  length = prompt["tokens"].shape[1]
  out = _teacher(prompt, res)
  valid, is_img = res["valid"], res["is_image"]
  assert valid.all() and (res["num_images"] == 2).all()
  text = ~is_img
  assert tol(np.asarray(out.logits)[:, length - 1:length - 1 + M][text], res["logits"][text])
  th = affine_from_raw(jnp.asarray(res["raw"]), "starflow", cfg.soft_clip)
  tf_mu = np.asarray(out.theta.shift)[:, length:]
  tf_sigma = np.asarray(out.theta.scale)[:, length:]
  assert tol(tf_mu[is_img], np.asarray(th.shift)[is_img])
  assert tol(tf_sigma[is_img], np.asarray(th.scale)[is_img])
  for k in range(2):
    cells = jnp.broadcast_to(jnp.arange(pt.N), (len(LENS), pt.N))
    eps = loop.latent_noise(jax.random.fold_in(KEY, 1), jnp.arange(len(LENS)), jnp.full((2,), k),
                            cells, cfg.token_dim)
    assert tol(np.asarray(out.z)[:, k], eps)
  toks = res["tokens"]
  for start in (0, SECOND + 1):
    assert (toks[:, start:start + pt.N] == SP.image_pad).all()
    assert (toks[:, start + pt.N] == SP.vision_end).all()
  assert (toks[:, SECOND] == SP.vision_start).all()
  assert not np.isin(toks[:, pt.N + 1:SECOND], [SP.vision_end, SP.image_pad]).any()


# threshold < 0 and max_iter = block - 1: Jacobi is exact (each iteration fixes one more latent)
JAC = loop.GenerateConfig(specials=SP, max_new_tokens=M, max_images=2,
                          jacobi=Jacobi(block_size=4, threshold=-1.0, max_iter=3))


def test_jacobi_equals_sequential(interleaved):
  """Property 21 (a, c): threshold < 0 and max_iter = block - 1: every latent of both images and the
  text after them equal sequential decoding; the loop reports the iterations of every chunk."""
  prompt, seq = interleaved
  res = _run(JAC, prompt, _forced(len(LENS)))
  assert tol(res["latents"][:, 0], seq["latents"][:, 0])
  # The second image is drawn after ~40 float32 steps of a random (expansive) model, which amplify
  # rounding differences between chunked and single-position matmuls (1e-7) along the chain.
  assert tol(res["latents"][:, 1], seq["latents"][:, 1], 1e-3)
  np.testing.assert_array_equal(res["tokens"], seq["tokens"])
  np.testing.assert_array_equal(res["positions"], seq["positions"])
  np.testing.assert_array_equal(res["jacobi_iters"], np.full(2 * pt.N // 4, 3))


def test_jacobi_rows_out_of_step_fall_back_to_sequential():
  """The loop module's rule: Jacobi chunks only while every row is in image mode at the same
  block-aligned cell. Row 0 starts in its image, row 1 two columns later (after a text token, then a
  forced <|vision_start|>): the rows never align, no chunk runs, and the Jacobi generator gives
  exactly the sequential result (the same compiled generators as above)."""
  prompt = _prompt(LENS, SP.vision_start, seed=4)
  prompt["tokens"][1, -1] = 7
  forced = np.full((len(LENS), M), -1, np.int32)
  forced[1, 0] = 9
  forced[:, 1] = SP.vision_start
  seq, jac = (_run(g, prompt, forced) for g in (GEN, JAC))
  assert (jac["jacobi_iters"] == -1).all()
  assert (seq["num_images"] >= 1).all() and seq["is_image"][0, 0] and not seq["is_image"][1, :2].any()
  np.testing.assert_array_equal(jac["tokens"], seq["tokens"])
  assert tol(jac["latents"], seq["latents"])


@pytest.fixture(scope="module")
def guided():
  """[cond; uncond] text-to-image batches, the null prompts shorter (left-padded to the same end)."""
  prompt = _concat(_prompt(LENS, SP.vision_start), _prompt(LENS, SP.vision_start, seed=1, null=True))
  gcfg = loop.GenerateConfig(specials=SP, max_new_tokens=M, max_images=2, stop_after_images=1,
                             guidance=Guidance(weight=2.0))
  forced = np.full((len(LENS), M), -1, np.int32)
  return prompt, {w: _run(gcfg, prompt, forced, jnp.float32(w)) for w in (0.0, 2.0)}


def test_guidance_zero_equals_unguided(guided, interleaved):
  """Property 38: w = 0 on the doubled batch gives the unguided image; a text-to-image row stops after
  its <|vision_end|>."""
  _, runs = guided
  _, seq = interleaved
  assert tol(runs[0.0]["latents"][:, 0], seq["latents"][:, 0])
  assert (runs[0.0]["lengths"] == pt.N + 1).all() and (runs[0.0]["num_images"] == 1).all()


def test_guided_halves_aligned(guided):
  """Properties 22, 37 (b), 38: the teacher-forced [cond; uncond] forward on the generated sequence
  (both halves fed the same u) gives per-half Gaussians equal to those of the loop, and their Gaussian
  combination reproduces each latent: (u - mu_eff) / sigma_eff is the step's noise."""
  prompt, runs = guided
  res = runs[2.0]
  cfg = tiny()[0]
  b, length = len(LENS), prompt["tokens"].shape[1]
  out = _teacher(prompt, res)
  img = np.concatenate([res["is_image"]] * 2)
  th = affine_from_raw(jnp.asarray(res["raw"]), "starflow", cfg.soft_clip)
  assert tol(np.asarray(out.theta.shift)[:, length:][img], np.asarray(th.shift)[img])
  assert tol(np.asarray(out.theta.scale)[:, length:][img], np.asarray(th.scale)[img])
  sl = slice(length, length + pt.N)
  tf = Affine(*(np.asarray(a)[:, sl] for a in out.theta))
  cond, uncond = (Affine(*(jnp.asarray(a[h * b:(h + 1) * b]) for a in tf)) for h in (0, 1))
  eff = Guidance(weight=2.0).combine(cond, uncond, 2.0)
  eps = loop.latent_noise(jax.random.fold_in(KEY, 1), jnp.arange(b), jnp.zeros((b,), jnp.int32),
                          jnp.broadcast_to(jnp.arange(pt.N), (b, pt.N)), cfg.token_dim)
  assert tol(eff.forward(jnp.asarray(res["latents"][:, 0])), eps)
  assert not tol(res["latents"][:, 0], runs[0.0]["latents"][:, 0], 1e-3)  # guidance did something


def test_shallow_inversion_inverts_shallow_forward(x64):
  """Property 37 (c), an exact identity (float64): shallow inversion then the shallow forward returns u.
  (In float32 the random blocks' small scales amplify rounding to ~5e-5. The Jacobi inversion is the
  flow core's `invert_jacobi`, tested in test_flow_sampling and run by test_sample_starflow2.)"""
  cfg, model, _, params, _ = pt.build(param_dtype="float64", dtype="float64")
  params = pt.perturbed(params)
  u = jax.random.normal(jax.random.key(3), (3, pt.N, cfg.token_dim), jnp.float64)
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x[:, None],
                                         method=pmodel.Pretzel.shallow_forward)[0][:, 0])
  x, _ = jax.jit(functools.partial(decode.shallow_inverse, model))(params, u)
  assert x.dtype == jnp.float64 and tol(fwd(params, x), u, 1e-10)


@pytest.mark.slow
def test_score_denoising_is_one_tweedie_step(x64):
  """Property 25 on the tiny Pretzel (float64): the denoised x is x + sigma^2 grad log p(x | C), log p
  the image's summed density (= -N D L_NF of the teacher-forced loss), the gradient equal to central
  finite differences; the other image of the sequence is held fixed."""
  cfg, model, vlm, params, vparams = pt.build(param_dtype="float64", dtype="float64")
  params = pt.perturbed(params)
  inputs = pt.inputs_of(pt.sequence([[[3, ("img", True), 2, ("img", True), 2]]], 48, 2))
  x_all = pt.latents(1, 2, seed=5, dtype=jnp.float64)
  u_all = jax.jit(lambda x: model.apply({"params": params}, x,
                                        method=pmodel.Pretzel.shallow_forward)[0])(x_all)
  logp = jax.jit(lambda x: decode.image_log_density(model, params, vlm, vparams, inputs, u_all, 1, x))
  x = x_all[:, 1]
  nll = jax.jit(lambda x: ploss.image_nll(pmodel.forward(model, params, vlm, vparams, inputs, x,
                                                         "nf"))[:, 1])(x_all)
  assert tol(logp(x), -pt.N * cfg.token_dim * nll, 1e-10)
  den = jax.jit(lambda x: decode.score_denoise(model, params, vlm, vparams, inputs, u_all, 1, x))(x)
  grad = (den - x) / cfg.noise_std ** 2
  h = 1e-5
  for n, c in ((0, 0), (7, 2), (15, 3)):
    e = jnp.zeros_like(x).at[0, n, c].set(h)
    fd = (logp(x + e) - logp(x - e))[0] / (2 * h)
    assert abs(float(grad[0, n, c]) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd)))


def test_stage3_start_greedy_text_equals_plain_vlm():
  """With W_D = W_vlm = 0 (the start of stage 3), greedy decoding of a text prompt gives the plain
  VLM's greedy tokens (vlm.generate), stop ids included."""
  cfg, model, vlm, params, vparams = tiny()
  params = dict(params, w_d=jax.tree.map(jnp.zeros_like, params["w_d"]),
                w_vlm=jax.tree.map(jnp.zeros_like, params["w_vlm"]))
  prompt = _prompt(LENS, 7, seed=3)
  p = prompts.with_input_latents(prompt, cfg.token_dim)
  p["forced"] = jnp.full((len(LENS), M), -1, jnp.int32)
  res = jax.device_get(loop.jitted_generate(model, vlm, GEN, params, vparams, p, KEY, len(LENS),
                                            True))  # the interleaved run's compiled generator
  s = vlm_generate.SamplingConfig(max_new_tokens=M, eos_ids=SP.stop_ids, pad_id=SP.pad,
                                  vocab_limit=cfg.text_vocab)
  plain = vlm_generate.generate(vlm, vparams, jnp.asarray(prompt["tokens"]), jnp.asarray(prompt["valid"]),
                                jnp.asarray(prompt["positions"]), jnp.asarray(prompt["next_position"]),
                                KEY, s)
  toks = np.asarray(plain["tokens"])
  assert not np.isin(toks, [SP.vision_start, SP.vision_end, SP.image_pad]).any()
  np.testing.assert_array_equal(res["tokens"], toks)
  np.testing.assert_array_equal(res["lengths"], np.asarray(plain["lengths"]))


def test_prompt_longer_than_cache():
  class Builder:  # prompts.batch reads the builder's ids first
    ids = SP

  with pytest.raises(UserError, match="sample.cache_len=20"):
    prompts.batch(Builder(), [np.arange(15, dtype=np.int32)], cache_len=20, max_new_tokens=8)


def test_document_parts_leave_out_an_image_cut_off_by_max_new_tokens():
  """A document's parts list only finished images: one cut off by max_new_tokens has no decoded image
  (`num_images` counts finished ones), so its index would point past the images."""
  from starflow2_jax.generate.api import document_parts
  dec = lambda t: "".join(chr(97 + i % 26) for i in t)  # noqa: E731
  start, end, pad = SP.vision_start, SP.vision_end, SP.image_pad
  assert document_parts([1, 2, start, pad, pad, end, 3, start, pad], SP, dec) == ["bc", 0, "d"]
  assert document_parts([pad, pad, end, 4, start, pad, pad, end], SP, dec, in_image=True) == [0, "e", 1]
  assert document_parts([pad], SP, dec, in_image=True) == []
  assert document_parts([5, SP.im_end], SP, dec) == ["f" + dec([SP.im_end])]
