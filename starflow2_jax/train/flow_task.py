"""The flow (TarFlow / STARFlow) task: `config.model` -> FlowModel, its loss, held-out bits/dim, samples.

Per-example randomness (dequantisation noise, label dropout) is drawn from `fold_in(step_rng, pos)`
with `pos` the example's position in the global batch, so the loss does not depend on the mesh or on
gradient accumulation. Label dropout is therefore applied here (the same rule as `flows.drop_labels`,
per example), and the model is applied with `train=False`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from starflow2_jax import flows
from starflow2_jax.train.tasks import Task

_NOISE, _DROP = 0, 1  # sub-stream ids of the per-example key
UINT8_HALF_RANGE = 127.5  # uint8 [0, 255] -> [-1, 1]


def images_to_float(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, C] -> float32 in [-1, 1]."""
  return images.astype(jnp.float32) / UINT8_HALF_RANGE - 1.0


def _check_data_matches_model(config: ml_collections.ConfigDict, fcfg: flows.FlowConfig) -> None:
  d = config.data
  if (d.image_size, d.image_size, d.channels) != fcfg.image_shape:
    raise ValueError(f"data.image_size={d.image_size}, data.channels={d.channels} give images of "
                     f"{(d.image_size, d.image_size, d.channels)}, but model.image_size/channels expect "
                     f"{fcfg.image_shape}; set them to the same values")


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules) -> Task:
  del mesh, rules  # the flow model has no frozen subtree; parameters are sharded by the loop
  fcfg = flows.FlowConfig.from_config(config.model)
  _check_data_matches_model(config, fcfg)
  model = flows.FlowModel(fcfg)
  conditional = fcfg.num_classes > 0
  guidance = float(config.log.get("guidance", 0.0))

  def init_fn(rng):
    tokens = jnp.zeros((1, fcfg.num_tokens, fcfg.token_dim), jnp.float32)
    labels = jnp.zeros((1,), jnp.int32) if conditional else None
    return model.init({"params": rng}, tokens, labels)["params"]

  def forward(params, images, labels, pos, rng, dequant, drop):
    keys = jax.vmap(lambda p: jax.random.fold_in(rng, p))(pos)
    x = images_to_float(images)
    x = jax.vmap(lambda k, xi: flows.dequantize(jax.random.fold_in(k, _NOISE), xi, dequant,
                                                fcfg.noise_std))(keys, x)
    if conditional and drop > 0:
      u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, _DROP)))(keys)
      labels = jnp.where(u < drop, -1, labels)
    tokens = flows.patchify(x, fcfg.patch_size, fcfg.layout)
    return model.apply({"params": params}, tokens, labels if conditional else None, train=False)

  def loss_fn(params, frozen, batch, rng):
    del frozen
    out = forward(params, batch["image"], batch["label"], batch["pos"], rng, fcfg.dequant,
                  fcfg.label_drop)
    nll = flows.nll_per_sample(out)
    loss = jnp.mean(flows.nll_per_sample(out, fcfg.latent_norm_reg), dtype=jnp.float32)
    return loss, {"bpd": jnp.mean(flows.bits_per_dim(nll), dtype=jnp.float32)}

  def eval_fn(params, frozen, batch, rng):
    """Bits/dim on uniformly dequantised data (STARFLOW2.md 2.5); with labels, and unconditional."""
    del frozen
    out = forward(params, batch["image"], batch["label"], batch["pos"], rng, "uniform", 0.0)
    res = {"bpd": flows.bits_per_dim(flows.nll_per_sample(out))}
    if conditional:
      out_u = forward(params, batch["image"], jnp.full_like(batch["label"], -1), batch["pos"], rng,
                      "uniform", 0.0)
      res["bpd_uncond"] = flows.bits_per_dim(flows.nll_per_sample(out_u))
    return res

  @jax.jit
  def sample_fn(params, frozen, rng, labels):
    del frozen
    variables = {"params": params}
    num = labels.shape[0]
    tokens = flows.sample(model, variables, rng, labels, num=num, guidance=guidance)
    if fcfg.dequant == "gaussian" and fcfg.noise_std > 0:
      tokens = flows.denoise(model, variables, tokens, labels)
    images = flows.unpatchify(tokens, fcfg.patch_size, fcfg.layout, fcfg.image_shape)
    return jnp.clip(images, -1.0, 1.0)

  return Task(init_fn=init_fn, loss_fn=loss_fn, eval_fn=eval_fn, sample_fn=sample_fn,
              tokens_per_example=fcfg.num_tokens, num_classes=fcfg.num_classes)

