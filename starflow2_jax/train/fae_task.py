"""The FAE task (`model_kind: fae`): `config.fae` -> FAE, its phase's loss, held-out PSNR, grids of
originals next to reconstructions, and the export with latent statistics (STARFLOW2.md section 6).

Batch: {"image": uint8 [b, S, S, 3]} (`ImageOnly`; a record's label and text are not used).

Phases (`fae.phase`; the parts that train are the task's params, the others its frozen subtree):
  head         head + feature_decoder train on frozen DINOv2 features x:
               L = mean (x_hat - x)^2 + beta_kl * mean_n sum_c KL, x_hat from z = mean + exp(logvar/2) eps
  pixel_noisy  pixel_decoder trains on x + pixel_noise * rms(x_n) * eps (phase A): L = pixel MSE
  pixel_recon  pixel_decoder trains on x_hat of the posterior mean (frozen head, feature decoder; B)
  joint        everything trains (toy): the feature target is stop_gradient(x), the pixel decoder
               trains in the same step on x_hat (its gradient reaches the trunk through the latent)
Frozen parts come from `fae.dinov2_checkpoint` (the trunk), `fae.frozen_from` (an FAE export or a run's
workdir: every other frozen part), else their initialisation. Pixel MSE is over [-1, 1] images; PSNR over
[0, 1] (clipped). Per-example noise is drawn from `fold_in(rng, pos)`, independent of the mesh.

Export (`Task.export_fn`): the whole FAE tree (trained and frozen parts) with `latent_stats` over the
first `fae.stats_images` training images: what `fae.load_fae` reads.
Parameter groups: the part names (trunk, head, feature_decoder, pixel_decoder).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from starflow2_jax import ckpt, parallel
from starflow2_jax.convert.hf_dinov2 import check_same_model
from starflow2_jax.data import pipeline
from starflow2_jax.errors import UserError
from starflow2_jax.fae import dinov2 as dinov2_lib
from starflow2_jax.fae.config import PARTS, STATS
from starflow2_jax.fae.model import FAE, kl_divergence, reparameterise, token_noise
from starflow2_jax.fae.stats import LatentMoments
from starflow2_jax.train import warm_start
from starflow2_jax.train.task import Task

_SAMPLE, _NOISE = 0, 1  # sub-stream ids of the per-example key
PIXEL_PHASES = ("pixel_noisy", "pixel_recon", "joint")
LATENT_PHASES = ("head", "joint")


class ImageOnly:
  """The grain record transform: record -> {"image": uint8 [S, S, 3]} (picklable)."""

  def __call__(self, record: dict) -> dict:
    return {"image": np.asarray(record["image"], np.uint8)}


def psnr(images: jax.Array, target_uint8: jax.Array) -> jax.Array:
  """PSNR in dB [b] of images in [-1, 1] against uint8 targets, both as [0, 1] (images clipped)."""
  x = jnp.clip((images.astype(jnp.float32) + 1.0) * 0.5, 0.0, 1.0)
  y = target_uint8.astype(jnp.float32) / 255.0
  mse = jnp.mean(jnp.square(x - y), axis=(1, 2, 3))
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def to_signed(images_uint8: jax.Array) -> jax.Array:
  return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def _check_data(config: ml_collections.ConfigDict, fae: FAE) -> None:
  d = config.data
  if (int(d.image_size), int(d.channels)) != (fae.image_size, 3):
    raise UserError(f"data.image_size={d.image_size}, data.channels={d.channels}: the FAE takes "
                    f"{fae.image_size}x{fae.image_size} RGB images (fae.image_size); set "
                    f"data.image_size={fae.image_size} and data.channels=3")


def _placed(tree, abstract, mesh, rules):
  """numpy tree -> global arrays in the shardings the logical rules give `abstract` (boxed)."""
  shardings = parallel.logical_to_shardings(abstract, mesh, rules)
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
                      tree, shardings)


def frozen_parts(fae: FAE, parts: tuple[str, ...], mesh, rules, seed: int):
  """The frozen subtree {part: params} of the parts that do not train (see the module docstring)."""
  spec = fae.spec
  if spec.phase == "pixel_recon" and not spec.frozen_from:
    raise UserError("fae.phase='pixel_recon' decodes the frozen head's and feature decoder's "
                    "reconstructions: set fae.frozen_from to the FAE of the head phase (its export or "
                    "workdir)")
  stored = None
  if spec.frozen_from:
    stored, path = warm_start.load(spec.frozen_from)
  rng = jax.random.key(seed)
  out = {}
  for i, part in enumerate(PARTS):
    if part in parts:
      continue
    abstract = jax.eval_shape(lambda r, p=part: fae.init_part(p, r), jax.random.key(0))
    if part == "trunk" and spec.dinov2_checkpoint:
      _, params, cfg = dinov2_lib.load_dinov2(spec.dinov2_checkpoint, mesh, rules)
      check_same_model(spec.dinov2, cfg, spec.dinov2_checkpoint)
      if cfg.input_hw != spec.dinov2.input_hw:
        raise UserError(f"fae.dinov2_checkpoint={spec.dinov2_checkpoint} was converted for "
                        f"{cfg.input_hw} px inputs, but fae.dinov2.input_size is "
                        f"{spec.dinov2.input_hw}; convert it again with --input_size")
      ckpt.check_tree_shapes(nn.unbox(abstract), params, f"fae.dinov2_checkpoint {spec.dinov2_checkpoint}")
      out[part] = params
    elif stored is not None and part in stored:
      ckpt.check_tree_shapes(nn.unbox(abstract), stored[part], f"fae.frozen_from {path} ({part})")
      out[part] = _placed(stored[part], abstract, mesh, rules)
    else:
      if spec.phase == "pixel_recon" and part in ("head", "feature_decoder"):
        raise UserError(f"fae.frozen_from={spec.frozen_from} holds no {part}: pixel_recon needs the "
                        "FAE of the head phase")
      if part == "trunk":
        logging.warning("fae: the frozen DINOv2 trunk is randomly initialised (set "
                        "fae.dinov2_checkpoint to a converted DINOv2)")
      init = jax.jit(lambda r, p=part: nn.unbox(fae.init_part(p, r)),
                     out_shardings=parallel.logical_to_shardings(abstract, mesh, rules))
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out[part] = init(jax.random.fold_in(rng, i))
  return out


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules) -> Task:
  if "fae" not in config:
    raise UserError("config.model_kind='fae' needs a config.fae section (see configs/fae_shapesworld.py)")
  fae = FAE(config.fae)
  spec = fae.spec
  _check_data(config, fae)
  parts = spec.trainable_parts
  frozen = frozen_parts(fae, parts, mesh, rules, int(config.train.seed)) or None
  frozen_sh = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
  phase = spec.phase

  def init_fn(rng):
    return {p: fae.init_part(p, jax.random.fold_in(rng, i)) for i, p in enumerate(PARTS) if p in parts}

  def whole(params, frozen):
    return {**(frozen or {}), **params}

  def per_example_keys(rng, pos):
    return jax.vmap(lambda p: jax.random.fold_in(rng, p))(pos)

  def loss_fn(params, frozen, batch, rng):
    p = whole(params, frozen)
    images = batch["image"]
    n = jnp.asarray(images.shape[0], jnp.float32)
    keys = per_example_keys(rng, batch["pos"])
    x = fae.trunk_features(p["trunk"], images)
    target = jax.lax.stop_gradient(x)
    terms = {}
    x_hat = None
    if phase in LATENT_PHASES + ("pixel_recon",):
      mean, logvar = fae.posterior(p, x)
      if phase == "pixel_recon":
        z = mean
      else:
        z = jax.vmap(lambda k, m, lv: reparameterise(jax.random.fold_in(k, _SAMPLE), m, lv))(
            keys, mean, logvar)
      x_hat = fae.decode_features(p, z)
    if phase in LATENT_PHASES:
      feature_mse = jnp.mean(jnp.square(x_hat - target), axis=(1, 2))
      kl = jnp.mean(jnp.sum(kl_divergence(mean, logvar), axis=-1), axis=-1)
      terms["feature_mse"] = (jnp.sum(feature_mse), n)
      terms["kl"] = (jnp.sum(kl), n)
    if phase in PIXEL_PHASES:
      if phase == "pixel_noisy":
        inputs = jax.vmap(lambda k, xi: token_noise(jax.random.fold_in(k, _NOISE), xi,
                                                    spec.pixel_noise))(keys, target)
      else:
        inputs = x_hat
      recon = fae.render(p, inputs)
      pixel_mse = jnp.mean(jnp.square(recon - to_signed(images)), axis=(1, 2, 3))
      terms["pixel_mse"] = (jnp.sum(pixel_mse), n)
      terms["psnr"] = (jnp.sum(psnr(recon, images)), n)
    return terms

  objective = {}
  if phase in LATENT_PHASES:
    objective.update(feature_mse=1.0, kl=float(spec.beta_kl))
  if phase in PIXEL_PHASES:
    objective["pixel_mse"] = 1.0

  def reconstruct(p, images):
    """images -> (x, x_hat of the posterior mean, reconstructed images in [-1, 1])."""
    x = fae.trunk_features(p["trunk"], images)
    x_hat = fae.decode_features(p, fae.posterior(p, x)[0])
    return x, x_hat, fae.render(p, x_hat)

  def eval_fn(params, frozen, batch, rng):
    """Per example: psnr (dB, image -> posterior mean -> features -> pixels), feature_mse; in phase
    pixel_noisy also psnr_features (the pixel decoder on the clean DINOv2 features)."""
    del rng
    p = whole(params, frozen)
    images = batch["image"]
    x, x_hat, recon = reconstruct(p, images)
    out = {"psnr": psnr(recon, images), "feature_mse": jnp.mean(jnp.square(x_hat - x), axis=(1, 2))}
    if phase == "pixel_noisy":
      out["psnr_features"] = psnr(fae.render(p, x), images)
    return out

  preview = _preview_images(config)

  def sample_fn(params, frozen, rng, num):
    """[num, S, S, 3] in [-1, 1]: held-out originals, each followed by its reconstruction."""
    del rng
    k = min(len(preview), max(1, num // 2))
    images = jnp.asarray(preview[:k])
    recon = jnp.clip(reconstruct(whole(params, frozen), images)[2], -1.0, 1.0)
    pairs = jnp.stack([to_signed(images), recon], axis=1).reshape(2 * k, *images.shape[1:])
    return pairs[:num]

  def export_fn(params, frozen):
    p = whole(params, frozen)
    p[STATS] = latent_stats(fae, p, config, mesh, rules)
    return p

  return Task(record_transform=ImageOnly(), init_fn=init_fn, loss_fn=loss_fn, objective=objective,
              eval_fn=eval_fn, sample_fn=jax.jit(sample_fn, static_argnums=(3,)),
              param_labels=lambda params: {k: jax.tree.map(lambda _, n=k: n, v) for k, v in params.items()},
              headline="psnr" if phase in PIXEL_PHASES else "feature_mse",
              tokens_per_example=spec.num_latents, frozen=frozen, frozen_shardings=frozen_sh,
              export_fn=export_fn)


def _preview_images(config: ml_collections.ConfigDict) -> np.ndarray:
  """The first held-out images shown in the sample grids, uint8 [k, S, S, 3] (k = num_samples / 2)."""
  k = max(1, int(config.log.num_samples) // 2)
  source = pipeline.build_source(config.data, config.data.eval_split)
  batch = next(pipeline.eval_batches(config.data, source, k, ImageOnly(), limit=k))
  return batch["image"]


def latent_stats(fae: FAE, params, config: ml_collections.ConfigDict, mesh, rules) -> dict:
  """{"mean", "std"} [C] of the posterior mean over the first fae.stats_images training images (in
  order, no augmentation), each process encoding its rows of every global batch."""
  fn = jax.jit(lambda p, images: fae.posterior(p, fae.trunk_features(p["trunk"], images))[0])
  source = pipeline.build_source(config.data, config.data.train_split)
  shards = parallel.batch_shards(mesh) * jax.process_count()
  batch_size = -(-int(config.train.batch_size) // shards) * shards
  moments = LatentMoments(fae.channels)
  for b in pipeline.eval_batches(config.data, source, batch_size, ImageOnly(),
                                 int(fae.spec.stats_images)):
    n = len(b["image"])
    padded = -(-n // shards) * shards
    images = np.concatenate([b["image"], np.repeat(b["image"][-1:], padded - n, 0)])
    local = {"image": images[parallel.host_batch_slice(padded)]}
    gb = parallel.make_global_batch(local, mesh, padded)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      z = fn(params, gb["image"])
    moments.add(np.asarray(multihost_utils.process_allgather(z, tiled=True))[:n])
  stats = moments.result()
  logging.info("fae latent statistics over %d latents: mean in [%.3g, %.3g], std in [%.3g, %.3g]",
               moments.n, stats["mean"].min(), stats["mean"].max(), stats["std"].min(),
               stats["std"].max())
  rep = parallel.replicated(mesh)
  return {k: jax.make_array_from_callback(v.shape, rep, lambda i, v=v: v[i]) for k, v in stats.items()}
