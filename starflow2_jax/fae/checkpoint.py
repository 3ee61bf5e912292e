"""Loading a trained FAE: the parameter checkpoint `launch.train` exports for `model_kind: fae`
(WORKDIR/params_<step>/: config.json with the `fae` section, and {"params": the whole FAE tree with its
latent statistics})."""
from __future__ import annotations

import flax.linen as nn
import jax

from starflow2_jax import ckpt, parallel
from starflow2_jax.errors import UserError
from starflow2_jax.fae.model import FAE

MODEL_KIND = "fae"


def load_fae(checkpoint: str, mesh: jax.sharding.Mesh | None = None,
             rules=parallel.DEFAULT_LOGICAL_RULES):
  """-> (FAE, params) with params placed on `mesh` by the logical rules (None: one device)."""
  config = ckpt.load_config(checkpoint)
  if config.get("model_kind", None) != MODEL_KIND or "fae" not in config:
    raise UserError(f"{checkpoint}: expected an FAE checkpoint (model_kind {MODEL_KIND!r} with a fae "
                    f"section), found model_kind {config.get('model_kind', None)!r}; train one with "
                    "python -m launch.train --config=configs/fae_shapesworld.py")
  fae = FAE(config.fae)
  abstract = fae.abstract_params(with_stats=True)
  shardings = parallel.param_shardings(abstract, mesh, rules)
  params = ckpt.load_params(checkpoint, {"params": nn.unbox(abstract)}, {"params": shardings})["params"]
  return fae, params
