"""Training stages (REFERENCE-BEHAVIOURS G 41, 42, F 32, 39; STARFLOW2.md 5.4): parameter groups, each
stage's steps change only its groups (frozen ones bit-identical, without moments or decay), the chain
stage 1 -> 2 -> 3 through warm starts from parameter checkpoints, the stage-1 and stage-2 shortcuts
against the full computation (float64), and the stage configuration errors."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import pretzel_tiny as pt
from starflow2_jax import ckpt, parallel
from starflow2_jax.errors import UserError
from starflow2_jax.pretzel import loss as ploss, model as pmodel, stages
from starflow2_jax.train import optimizer, state as state_lib, step as step_lib, warm_start

DECAY = 0.5  # a weight decay that moves every parameter it touches
STEPS = 3
ROWS = [[[5, ("img", True), 3]], [[("img", False), 6]]]  # text-to-image, understanding
L, I = 40, 1


def _train_config(number):
  c = ml_collections.ConfigDict({"model": {"skip_taps": []}, "train": {
      "lr": 1e-2, "init_lr": 1e-2, "min_lr": 1e-2, "warmup": 0, "steps": 10, "b1": 0.9, "b2": 0.95,
      "eps": 1e-8, "weight_decay": DECAY, "clip_norm": 0.0, "grad_accum": 1, "ema_decay": 0.0,
      "trainable": []}})
  return stages.apply_stage(c, number)


def _loss_fn(number, model, vlm, cfg, mode=None):
  """The task's loss on hand-built batches: latents come from batch["x"] instead of the FAE."""
  s = stages.stage(number)

  def loss_fn(params, frozen, batch, rng):
    inputs = {k: batch[k] for k in pmodel.INPUT_KEYS}
    out = pmodel.forward(model, params, vlm, frozen["vlm"], inputs, batch["x"], mode or s.mode)
    return ploss.batch_terms(ploss.per_example(out, batch, cfg.text_vocab, 1e-4, s.nf, s.ntp))

  return loss_fn


def _batch():
  b = pt.sequence(ROWS, L, I)
  b["x"] = np.asarray(pt.latents(len(ROWS), I))
  return b


def _run_stage(number, init_from=None, tmp=None):
  """STEPS steps of stage `number` from the production init (warm-started from `init_from`).
  Returns (params before, params after, last grads, opt_state, labels), numpy trees."""
  cfg, model, vlm, params, vp = pt.build()
  tc = _train_config(number)
  mesh = parallel.make_mesh({"shape": {"data": 1}}, jax.devices()[:1])
  rules = parallel.DEFAULT_LOGICAL_RULES
  init = lambda r: pmodel.init_params(model, r)  # noqa: E731
  labels = stages.param_labels(params)
  tx = optimizer.make_optimizer(tc.train, labels)
  sh = state_lib.state_shardings(init, tx, jax.random.key(0), mesh, rules, False)
  state = jax.device_put(state_lib.TrainState(  # the production init, without compiling init again
      step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(tx.init)(params),
      ema_params=None, skipped=jnp.zeros((), jnp.int32)), sh)
  if init_from:
    state, _ = warm_start.apply(state, sh, tx, init_from)
  before = jax.tree.map(np.asarray, state.params)
  frozen = {"vlm": vp}
  frozen_sh = jax.tree.map(lambda _: parallel.replicated(mesh), frozen)
  step = step_lib.make_train_step(_loss_fn(number, model, vlm, cfg), tx,
                                  optimizer.learning_rate_schedule(tc.train), tc.train, mesh, rules, sh,
                                  frozen_sh, objective=stages.objective(number, 1.0),
                                  trainable=optimizer.trainable_mask(labels, tc.train),
                                  return_grads=True)
  batch = parallel.make_global_batch(_batch(), mesh, len(ROWS))
  for _ in range(STEPS):
    state, metrics, grads = step(state, frozen, batch, jax.random.key(3))
    assert int(metrics["finite"]) == 1
  after = jax.tree.map(np.asarray, state.params)
  return before, after, jax.tree.map(np.asarray, grads), state.opt_state, labels


def _leaves(tree):
  return [(jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _check_stage(number, before, after, grads, opt_state, labels):
  train = set(stages.stage_groups(number, stages.GROUPS))
  for (path, a), b, g, group in zip(_leaves(before), jax.tree.leaves(after), jax.tree.leaves(grads),
                                    jax.tree.leaves(labels)):
    if group in train:
      assert not np.array_equal(a, b), (number, path)
    else:
      assert np.array_equal(a, b), (number, path)  # no update, no weight decay
      assert not np.any(g), (number, path)
  moments = [p for p, x in _leaves(opt_state) if x.ndim]
  assert moments and all(any(f"['{n}']" in p for n in _top_names(before, train)) for p in moments)


def _top_names(params, groups):
  return [name for name in params if stages.group_of(name) in groups]


def test_groups_cover_every_parameter():
  params = pt.build()[3]
  labels = stages.param_labels(params)
  assert sorted(set(jax.tree.leaves(labels))) == ["adapter", "deep", "shallow", "w_d", "w_vlm"]
  for path, group in zip([p for p, _ in _leaves(labels)], jax.tree.leaves(labels)):
    assert path.startswith(f"['{group}") or (group == "shallow" and path.startswith("['shallow_"))
  assert "p_txt" in params["deep"]  # P_txt trains with the deep stream
  assert stages.param_labels({"taps": {"tap_0": {"kernel": 0}}}) == {"taps": {"tap_0": {"kernel": "taps"}}}


@pytest.mark.slow  # three train-step compilations
def test_stages_chain_trains_only_their_groups_and_warm_start(tmp_path):
  """41 + 42: stage 1 (shallow, deep), stage 2 (adapter, warm-started from stage 1), stage 3 (all,
  from stage 2): frozen parameters bit-identical, no moments outside the stage; the stage-2 gradient
  of the adapter's zero output layer is non-zero (32); at the start of stage 3 the logits equal the
  stage-2 model's and z the stage-1 model's."""
  b1, a1, g1, o1, labels = _run_stage(1)
  _check_stage(1, b1, a1, g1, o1, labels)
  ckpt.save_params(str(tmp_path / "s1"), {"params": a1}, ml_collections.ConfigDict({"stage": 1}))
  b2, a2, g2, o2, _ = _run_stage(2, str(tmp_path / "s1"))
  for x, y in zip(jax.tree.leaves(b2), jax.tree.leaves(a1)):  # warm start took every parameter
    assert np.array_equal(x, y)
  _check_stage(2, b2, a2, g2, o2, labels)
  assert np.any(g2["adapter"]["fc2"]["kernel"])
  ckpt.save_params(str(tmp_path / "s2"), {"params": a2}, ml_collections.ConfigDict({"stage": 2}))
  b3, a3, g3, o3, _ = _run_stage(3, str(tmp_path / "s2"))
  _check_stage(3, b3, a3, g3, o3, labels)
  assert not np.any(b3["w_d"]["kernel"]) and not np.any(b3["w_vlm"]["kernel"])  # never trained yet
  batch = _batch()
  fwd = pt.forward_fn()
  _, _, _, _, vp = pt.build()
  s3, alone = fwd(jax.tree.map(jnp.asarray, b3), vp, pt.inputs_of(batch), jnp.asarray(batch["x"]))
  s2, _ = fwd(jax.tree.map(jnp.asarray, a2), vp, pt.inputs_of(batch), jnp.asarray(batch["x"]))
  s1, _ = fwd(jax.tree.map(jnp.asarray, a1), vp, pt.inputs_of(batch), jnp.asarray(batch["x"]))
  valid = batch["segment_ids"] > 0
  assert np.array_equal(np.asarray(s3.logits)[valid], np.asarray(alone)[valid])  # one compiled call
  assert np.array_equal(np.asarray(s3.logits), np.asarray(s2.logits))
  t2i = batch["image_flow_loss"][:, 0]
  assert np.array_equal(np.asarray(s3.z)[t2i], np.asarray(s1.z)[t2i])


@pytest.mark.slow  # three float64 gradient compilations
def test_stage_shortcuts_are_exact_float64(x64):
  """39: stage 1 with the VLM run on a prefix ending at <|vision_start|> gives the L_NF and gradients
  of the full computation; stage 2 without the deep stream gives L_NTP and adapter gradients of the
  full one (W_D = 0), 1e-12 in float64."""
  prefix = 6  # row 0: 5 text tokens, then <|vision_start|> at index 5 (row 1 has no flow-loss image)
  over = dict(param_dtype="float64", dtype="float64")
  cfg, model, vlm = pt.model_of(**over)
  cut, cmodel, _ = pt.model_of(stage1_vlm_prefix=prefix, **over)
  base = pt.build()[3]
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), pt.perturbed(base, seed=4))
  params = dict(params, w_d=jax.tree.map(jnp.zeros_like, params["w_d"]),
                w_vlm=jax.tree.map(jnp.zeros_like, params["w_vlm"]),
                adapter=dict(params["adapter"], fc2=jax.tree.map(jnp.zeros_like, params["adapter"]["fc2"])))
  vp = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), pt.build()[4])
  batch = _batch()
  batch = {k: jnp.asarray(v, jnp.float64 if k == "x" else None) for k, v in batch.items()}
  assert int(np.argmax(np.asarray(batch["tokens"][0]) == pt.VSTART)) == 5

  def losses(m, mode, terms_of):
    f = _loss_fn({"full": 3, "nf": 1, "ntp": 2}[mode], m, vlm, cfg)

    def loss(p, t):
      terms = f(p, {"vlm": vp}, batch, None)
      return terms[t][0] / terms[t][1]
    return jax.jit(lambda p: [jax.value_and_grad(loss)(p, t) for t in terms_of])(params)

  def close(a, b):
    for (path, x), y in zip(_leaves(a), jax.tree.leaves(b)):
      assert np.max(np.abs(np.asarray(x) - np.asarray(y))) <= 1e-12 * max(1, np.max(np.abs(y))), path

  full = losses(model, "full", ("nf", "ntp"))  # [L_NF, L_NTP] and their gradients
  nf = losses(cmodel, "nf", ("nf",))
  ntp = losses(model, "ntp", ("ntp",))
  (full_nf, g_full_nf), (full_ntp, g_full_ntp) = full
  (nf, g_nf), = nf
  (ntp, g_ntp), = ntp
  close(full_nf, nf)
  for group in ("shallow_0", "shallow_1", "deep"):  # stage 1 trains these
    close(g_full_nf[group], g_nf[group])
  assert np.any(np.asarray(g_nf["deep"]["transformer"]["stack"]["mlp"]["fc1"]["kernel"]))
  close(full_ntp, ntp)
  close(g_full_ntp["adapter"], g_ntp["adapter"])  # stage 2 trains the adapter
  assert np.any(np.asarray(g_ntp["adapter"]["fc2"]["kernel"]))
  assert np.asarray(ntp).dtype == np.float64


def test_stage_configuration_errors():
  present = list(stages.GROUPS[:-1])  # no taps
  c = _train_config(2)
  assert list(c.train.trainable) == ["adapter"] and stages.objective(2, 0.5) == {"ntp": 1.0}
  assert stages.objective(3, 0.5) == {"nf": 1.0, "ntp": 0.5} and stages.objective(1, 0.5) == {"nf": 1.0}
  assert stages.check_trainable(c, present) == ("adapter",)
  c.train.trainable = []
  with pytest.raises(UserError, match=r"stage 2 has no trainable group.*train.trainable=\['adapter'\]"):
    stages.check_trainable(c, present)
  c.train.trainable = ["adapter", "deep"]
  with pytest.raises(UserError, match=r"stage 2 trains only \['adapter'\], not \['deep'\]"):
    stages.check_trainable(c, present)
  c3 = _train_config(3)
  assert "taps" not in c3.train.trainable
  c3.train.trainable = ["taps"]
  with pytest.raises(UserError, match=r"stage 3 trains only .*, not \['taps'\]"):
    stages.check_trainable(c3, present)  # the model has no taps
  with pytest.raises(UserError, match="config.stage: expected one of"):
    stages.stage(4)
  with pytest.raises(UserError, match="expected 'stage=N'"):
    stages.stage_from_arg("stage=7")
  assert stages.stage_from_arg("stage=2") == 2 and stages.stage_from_arg(None) == 1
