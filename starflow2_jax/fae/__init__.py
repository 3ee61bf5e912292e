"""The FAE image latent space (STARFLOW2.md section 6): DINOv2 trunk, encoder head, feature decoder,
pixel decoder, latent statistics.

  fae = FAE(config.fae)                      static; fae.grid, fae.channels, fae.image_size, fae.config
  params = fae.init(rng)                     {trunk, head, feature_decoder, pixel_decoder}
  latents = fae.encode(params, images)       uint8 [B, S, S, 3] -> normalised float32 [B, h, w, C]
  images = fae.decode(params, latents)       -> float32 [B, S, S, 3] in [0, 1]
  fae, params = load_fae(checkpoint_dir)     a trained FAE (launch.train, model_kind fae), with stats
"""
from starflow2_jax.fae.checkpoint import load_fae
from starflow2_jax.fae.config import FAEConfig, StackConfig
from starflow2_jax.fae.dinov2 import Dinov2, Dinov2Config, load_dinov2
from starflow2_jax.fae.model import FAE, kl_divergence, reparameterise, token_noise
from starflow2_jax.fae.stats import compute_latent_stats

__all__ = ["FAE", "FAEConfig", "StackConfig", "Dinov2", "Dinov2Config", "load_dinov2", "load_fae",
           "kl_divergence", "reparameterise", "token_noise", "compute_latent_stats"]
