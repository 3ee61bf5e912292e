"""The flow (TarFlow / STARFlow) task: `config.model` -> FlowModel, its loss, held-out bits/dim, samples.

Batch: {"image": uint8 [b, H, W, C], "label": int32 [b] (-1: none)} from `ImageLabel` (the record's
caption and QA are not used by this model).

Per-example randomness (dequantisation noise, label dropout) is drawn from `fold_in(step_rng, pos)`
with `pos` the example's position in the global batch, so the loss does not depend on the mesh or on
gradient accumulation. Label dropout is therefore applied here (`drop_labels`: the training path's own
rule, per example; a dropped label is -1, which the model embeds as the mean class embedding), and the
model is applied with `train=False`.

Parameter groups: a parameter's group is its top-level module, i.e. the flow block `blocks_<i>` (every
FlowModel parameter lives in a block), so `train.trainable=["blocks_3"]` trains only the last block of
a 4-block model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from starflow2_jax import flows
from starflow2_jax.errors import UserError
from starflow2_jax.flows.cli import guidance_from_config
from starflow2_jax.train.task import Task

_NOISE, _DROP = 0, 1  # sub-stream ids of the per-example key
UINT8_HALF_RANGE = 127.5  # uint8 [0, 255] -> [-1, 1]


class ImageLabel:
  """The grain record transform: record -> {"image": uint8 [H, W, C], "label": int32 []} (picklable)."""

  def __call__(self, record: dict) -> dict:
    return {"image": np.asarray(record["image"], np.uint8),
            "label": np.int32(record.get("label", -1))}


def images_to_float(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, C] -> float32 in [-1, 1]."""
  return images.astype(jnp.float32) / UINT8_HALF_RANGE - 1.0


def drop_labels(rng: jax.Array, pos: jax.Array, labels: jax.Array, rate: float) -> jax.Array:
  """labels int32 [b] -> [b]: example `pos` [b] is dropped (-1) iff uniform(fold_in(fold_in(rng, pos),
  _DROP)) < rate, a function of (rng, pos) only."""
  u = jax.vmap(lambda p: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(rng, p), _DROP)))(pos)
  return jnp.where(u < rate, -1, labels)


def param_labels(params):
  """The group of each parameter: its top-level module name (`blocks_<i>`)."""
  return {name: jax.tree.map(lambda _, n=name: n, sub) for name, sub in params.items()}


def _check_data_matches_model(config: ml_collections.ConfigDict, fcfg: flows.FlowConfig) -> None:
  d = config.data
  if (d.image_size, d.image_size, d.channels) != fcfg.image_shape:
    raise UserError(f"data.image_size={d.image_size}, data.channels={d.channels} give images of "
                    f"{(d.image_size, d.image_size, d.channels)}, but model.image_size/channels expect "
                    f"{fcfg.image_shape}; set them to the same values")


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules) -> Task:
  del mesh, rules  # the flow model has no frozen subtree; parameters are sharded by the loop
  fcfg = flows.FlowConfig.from_config(config.model)
  _check_data_matches_model(config, fcfg)
  model = flows.FlowModel(fcfg)
  conditional = fcfg.num_classes > 0
  guidance = guidance_from_config(config.get("sample", ml_collections.ConfigDict()), fcfg.parametrisation)

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
      labels = drop_labels(rng, pos, labels, drop)
    tokens = flows.patchify(x, fcfg.patch_size, fcfg.layout)
    return model.apply({"params": params}, tokens, labels if conditional else None, train=False)

  def loss_fn(params, frozen, batch, rng):
    """{"nll": (sum of the per-image objective (NLL + latent-norm reg.), images), "bpd": ...}."""
    del frozen
    out = forward(params, batch["image"], batch["label"], batch["pos"], rng, fcfg.dequant,
                  fcfg.label_drop)
    n = jnp.asarray(batch["pos"].shape[0], jnp.float32)
    nll = flows.nll_per_sample(out)
    objective = flows.nll_per_sample(out, fcfg.latent_norm_reg)
    return {"nll": (jnp.sum(objective, dtype=jnp.float32), n),
            "bpd": (jnp.sum(flows.bits_per_dim(nll), dtype=jnp.float32), n)}

  def eval_fn(params, frozen, batch, rng):
    """Bits/dim [b] on uniformly dequantised data (STARFLOW2.md 2.5); with labels, and unconditional."""
    del frozen
    out = forward(params, batch["image"], batch["label"], batch["pos"], rng, "uniform", 0.0)
    res = {"bpd": flows.bits_per_dim(flows.nll_per_sample(out))}
    if conditional:
      out_u = forward(params, batch["image"], jnp.full_like(batch["label"], -1), batch["pos"], rng,
                      "uniform", 0.0)
      res["bpd_uncond"] = flows.bits_per_dim(flows.nll_per_sample(out_u))
    return res

  def sample_fn(params, frozen, rng, num):
    """num images [num, H, W, C] in [-1, 1]: classes 0, 1, ... in turn (unconditional: -1), guided by
    config.sample, denoised when the model was trained on Gaussian-dequantised data."""
    del frozen
    labels = (jnp.arange(num, dtype=jnp.int32) % fcfg.num_classes) if conditional else \
        jnp.full((num,), -1, jnp.int32)
    variables = {"params": params}
    tokens = flows.sample(model, variables, rng, labels, num=num, guidance=guidance)
    if fcfg.dequant == "gaussian" and fcfg.noise_std > 0:
      tokens = flows.denoise(model, variables, tokens, labels)
    images = flows.unpatchify(tokens, fcfg.patch_size, fcfg.layout, fcfg.image_shape)
    return jnp.clip(images, -1.0, 1.0)

  return Task(record_transform=ImageLabel(), init_fn=init_fn, loss_fn=loss_fn, objective={"nll": 1.0},
              eval_fn=eval_fn, sample_fn=jax.jit(sample_fn, static_argnums=(3,)),
              param_labels=param_labels, headline="bpd", tokens_per_example=fcfg.num_tokens)
