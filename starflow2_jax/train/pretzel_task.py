"""The STARFlow2 task (`model_kind: starflow2`): the Pretzel model over Pretzel sequences, one stage of
its three-stage training (STARFLOW2.md 4, 5; `pretzel.stages`).

Batch: the rows of `pretzel.sequence.PretzelTransform` (tokens, targets, target_mask, positions,
segment_ids, is_image, image_slot, image_cell [b, L]; images uint8 [b, I, S, S, 3], image_valid,
image_flow_loss [b, I]), checked by `CheckedRows` (every image span holds the N latents of the FAE
grid; in stage 1 with `model.stage1_vlm_prefix`, every flow-loss image starts inside the prefix).

Frozen subtree (never differentiated, placed by the sharding rules):
  {"vlm": the Qwen2.5-VL language model (config.vlm.checkpoint: a converted checkpoint, `launch.convert
   --from=hf_qwen2_5_vl`; "": random init from config.vlm.model, for tiny configs),
   "fae": the FAE with its latent statistics (config.fae.checkpoint: `fae.load_fae`; "": a random FAE
   from config.fae with identity statistics, for tiny configs)}.
Latents are computed inside the loss: x = fae.encode(images) (normalised posterior mean), plus
model.noise_std * eps with eps drawn from fold_in(rng, pos) (pos: the row's place in the global batch,
so the loss is independent of the mesh and of gradient accumulation), patchified with model.latent_patch
in the STARFlow layout.

Loss terms ({term: (sum, count)}; `pretzel.loss`): "nf" (L_NF + latent-norm regulariser, per flow-loss
image), "latent_nll" (nats/dim), "ntp" (L_NTP, per supervised token); the stage's objective picks them
(stage 1 nf, stage 2 ntp, stage 3 nf + loss.lambda_ntp * ntp). Held-out: latent_nll and text_ce.
Parameter groups: `pretzel.stages.GROUPS`. Samples (config.log.num_samples > 0): text-to-image from
held-out captions by `starflow2_jax.generate` (`generate.api.training_sampler`).
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from starflow2_jax import parallel
from starflow2_jax.errors import UserError
from starflow2_jax.fae import FAE, load_fae
from starflow2_jax.flows.patchify import patchify
from starflow2_jax.pretzel import config as pconfig, loss as ploss, model as pmodel, stages
from starflow2_jax.pretzel import toy_tokenizer
from starflow2_jax.pretzel.sequence import PretzelTransform, SequenceSpec
from starflow2_jax.pretzel.tokens import special_tokens
from starflow2_jax.train.task import Task
from starflow2_jax.vlm import tokenizer as tok_lib
from starflow2_jax.vlm.chat import load_vlm
from starflow2_jax.vlm.model import Qwen2_5_VL, abstract_params

TOY_TOKENIZER = "toy"  # config.tokenizer: the ShapesWorld toy tokenizer, trained once into the cache
VISION_TOWER = "visual"  # the Qwen vision tower's subtree: not on the STARFlow2 path (STARFLOW2.md 4.1)
RANDOM_VECTOR_STD = 0.02  # random frozen stand-ins: vectors other than norms and biases (embeddings' std)
VLM_STREAM, FAE_STREAM = 1, 2  # sub-streams of the random frozen stand-ins' seeds


def loss_defaults() -> ml_collections.ConfigDict:
  """config.loss (STARFLOW2.md 5.1-5.3, 8.3)."""
  return ml_collections.ConfigDict({"lambda_ntp": 1.0, "latent_norm_reg": 1e-4,
                                    "nf_on_input_images": False})


def tokenizer_path(spec: str) -> str:
  """config.tokenizer -> a path `vlm.tokenizer.load_tokenizer` takes ('qwen2.5', a tokenizer.json or
  its directory; 'toy': the ShapesWorld toy tokenizer, trained into the cache on first use)."""
  if spec != TOY_TOKENIZER:
    return spec
  path = os.path.join(tok_lib.default_cache_dir(), "toy_shapesworld_tokenizer_map.json")
  if not os.path.exists(path):
    try:
      toy_tokenizer.train_shapesworld_tokenizer(path)
    except FileExistsError:  # another process trained it meanwhile (the same file: deterministic)
      pass
  return path


class CheckedRows:
  """The record transform: the Pretzel row of `transform`, checked (picklable).

  num_latents: N of the model's token grid; vlm_prefix: stage 1's VLM prefix (0: none)."""

  def __init__(self, transform: PretzelTransform, num_latents: int, vlm_prefix: int = 0):
    self.transform, self.num_latents, self.vlm_prefix = transform, int(num_latents), int(vlm_prefix)

  def __call__(self, record: dict) -> dict:
    row = self.transform(record)
    check_row(row, self.num_latents, self.vlm_prefix)
    return row


def check_row(row: dict, num_latents: int, vlm_prefix: int = 0) -> None:
  """UserError unless every valid image slot has exactly `num_latents` latent positions and, with a
  stage-1 VLM prefix, every flow-loss image's <|vision_start|> lies inside it."""
  slots = np.asarray(row["image_slot"])[np.asarray(row["is_image"], bool)]
  for k in np.nonzero(np.asarray(row["image_valid"]))[0]:
    n = int(np.sum(slots == k))
    if n != num_latents:
      raise UserError(f"image {k} of a row has {n} latent positions, but the FAE grid (with "
                      f"model.latent_patch) gives {num_latents}: the sequences' grid (SequenceSpec.grid) "
                      "and the model's token grid differ; build the sequences from this model's config")
    if vlm_prefix and row["image_flow_loss"][k]:
      start = int(np.argmax(np.asarray(row["image_slot"]) == k)) - 1  # its <|vision_start|>
      if start >= vlm_prefix:
        raise UserError(f"a flow-loss image starts at position {start}, past model.stage1_vlm_prefix="
                        f"{vlm_prefix}: stage 1 runs the VLM on that prefix only; raise it (or 0: the "
                        "whole sequence) or shorten data.max_len")


def random_frozen(abstract, mesh, rules, seed):
  """A random stand-in for a frozen component (tiny configs and tests: no checkpoint), drawn in NumPy
  from the abstract (boxed) tree, placed by the logical rules: kernels and tables N(0, 1/fan_in),
  norm scales and latent std 1, biases and latent mean 0, other vectors N(0, RANDOM_VECTOR_STD^2).
  The same on every process (seeded). On a compile-only mesh (`launch.compile`): ShapeDtypeStructs."""
  shardings = parallel.logical_to_shardings(abstract, mesh, rules)
  if parallel.compile_only(mesh):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nn.unbox(abstract), shardings)
  rng = np.random.default_rng(seed)

  def leaf(path, x, sharding):
    name = str(getattr(path[-1], "key", path[-1]))
    dtype = np.dtype(x.dtype)
    if name in ("scale", "std"):
      arr = np.ones(x.shape, dtype)
    elif name in ("bias", "mean"):
      arr = np.zeros(x.shape, dtype)
    elif len(x.shape) >= 2:
      arr = (rng.normal(size=x.shape) / np.sqrt(x.shape[-2])).astype(dtype)
    else:
      arr = (RANDOM_VECTOR_STD * rng.normal(size=x.shape)).astype(dtype)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])

  return jax.tree_util.tree_map_with_path(leaf, nn.unbox(abstract), shardings)


def frozen_vlm(config: ml_collections.ConfigDict, mesh, rules, seed):
  """-> (Qwen2_5_VL language model, its params without the vision tower, QwenConfig)."""
  checkpoint = config.vlm.get("checkpoint", "")
  if checkpoint:
    _, params, vconfig = load_vlm(checkpoint, mesh=mesh, rules=rules)
    qcfg = pconfig.qwen_config(vconfig)
    params = {k: v for k, v in params.items() if k != VISION_TOWER}
  else:
    qcfg = pconfig.qwen_config(config.vlm)
    logging.warning("config.vlm.checkpoint is empty: the frozen VLM is random (random_frozen)")
    params = random_frozen(abstract_params(qcfg), mesh, rules, seed)
  return Qwen2_5_VL(qcfg), params, qcfg


def fae_of(config: ml_collections.ConfigDict) -> FAE:
  """The FAE that config.fae describes (its fields other than `checkpoint`)."""
  return FAE(ml_collections.ConfigDict({k: v for k, v in config.fae.to_dict().items()
                                        if k != "checkpoint"}))


def frozen_fae(config: ml_collections.ConfigDict, mesh, rules, seed):
  """-> (FAE, its params with latent statistics)."""
  checkpoint = config.fae.get("checkpoint", "")
  if checkpoint:
    return load_fae(checkpoint, mesh, rules)
  fae = fae_of(config)
  logging.warning("config.fae.checkpoint is empty: the frozen FAE is random (random_frozen; identity "
                  "latent statistics)")
  return fae, random_frozen(fae.abstract_params(with_stats=True), mesh, rules, seed)


def _check_data(config: ml_collections.ConfigDict, fae: FAE) -> None:
  d = config.data
  if int(d.image_size) != fae.image_size:
    raise UserError(f"data.image_size={d.image_size}: the FAE encodes {fae.image_size}x{fae.image_size} "
                    f"images (fae.image_size); set data.image_size={fae.image_size}")


def latent_tokens(fae: FAE, fae_params, images, pos, rng, cfg: pconfig.PretzelConfig):
  """images uint8 [b, I, S, S, 3], pos [b] -> noisy normalised latent tokens [b, I, N, D_tok]."""
  b, i = images.shape[:2]
  z = fae.encode(fae_params, images.reshape(b * i, *images.shape[2:])).astype(cfg.flow_dtype)
  eps = jax.vmap(lambda p: jax.random.normal(jax.random.fold_in(rng, p), (i, *z.shape[1:]),
                                             cfg.flow_dtype))(pos)
  x = z.reshape(b, i, *z.shape[1:]) + cfg.noise_std * eps
  tokens = patchify(x.reshape(b * i, *z.shape[1:]), cfg.latent_patch, "starflow")
  return tokens.reshape(b, i, cfg.num_latents, cfg.token_dim)


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules) -> Task:
  stage = stages.stage(config.get("stage", None))
  tk_path = tokenizer_path(config.tokenizer)
  tokenizer = tok_lib.load_tokenizer(tk_path)
  specials = special_tokens(tokenizer)
  seed = int(config.train.seed)
  vlm, vlm_params, qcfg = frozen_vlm(config, mesh, rules, [seed, VLM_STREAM])
  fae, fae_params = frozen_fae(config, mesh, rules, [seed, FAE_STREAM])
  _check_data(config, fae)
  cfg = pconfig.from_config(config, vlm=qcfg, latent_grid=fae.grid, latent_channels=fae.channels,
                            text_vocab=tokenizer.get_vocab_size(with_added_tokens=True),
                            specials=specials)
  present = [g for g in stages.GROUPS if g != "taps" or cfg.skip_taps]
  stages.check_trainable(config, present)
  lossc = config.loss
  spec = SequenceSpec.from_config(config.data, cfg.token_grid, config.vlm.get("image_positions", "mrope"),
                                  bool(lossc.nf_on_input_images))
  model = pmodel.Pretzel(cfg)
  frozen = {"vlm": vlm_params, "fae": fae_params}
  reg, vocab = float(lossc.latent_norm_reg), cfg.text_vocab

  def init_fn(r):
    return pmodel.init_params(model, r)

  def run(params, frozen, batch, rng, mode):
    x = latent_tokens(fae, frozen["fae"], batch["images"], batch["pos"], rng, cfg)
    inputs = {k: batch[k] for k in pmodel.INPUT_KEYS}
    return pmodel.forward(model, params, vlm, frozen["vlm"], inputs, x, mode)

  def loss_fn(params, frozen, batch, rng):
    out = run(params, frozen, batch, rng, stage.mode)
    return ploss.batch_terms(ploss.per_example(out, batch, vocab, reg, stage.nf, stage.ntp))

  def eval_fn(params, frozen, batch, rng):
    """Per row: held-out latent NLL (nats/dim, over flow-loss images) and text CE (per token)."""
    out = run(params, frozen, batch, rng, "full")
    terms = ploss.per_example(out, batch, vocab, reg)
    return {"latent_nll": terms["latent_nll"], "text_ce": terms["ntp"]}

  transform = CheckedRows(PretzelTransform(spec, tk_path, int(config.train.seed)), cfg.num_latents,
                          cfg.stage1_vlm_prefix if stage.mode == "nf" else 0)
  sample_fn = None
  if int(config.log.num_samples) > 0:
    from starflow2_jax.generate import api  # noqa: PLC0415 (generation imports this module)
    sample_fn = api.training_sampler(config, model, vlm, fae, tk_path, mesh, rules)
  return Task(record_transform=transform, init_fn=init_fn, loss_fn=loss_fn,
              objective=stages.objective(config.stage, float(lossc.lambda_ntp)), eval_fn=eval_fn,
              sample_fn=sample_fn, param_labels=stages.param_labels,
              headline="latent_nll" if stage.nf else "ntp", tokens_per_example=spec.max_len,
              frozen=frozen, frozen_shardings=jax.tree.map(lambda a: a.sharding, frozen), packs=True)
