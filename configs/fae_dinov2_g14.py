"""The paper FAE (STARFLOW2.md 6.5): frozen DINOv2-g/14 at 224 px (256-px images resized), encoder
head 24 x 256, feature decoder 6 x 1536 (RMSNorm, SwiGLU 4096, 2-D RoPE), ViT-L pixel decoder, 32
latent channels on the 16 x 16 grid. Three phases, each warm-started from the previous one:

  python -m launch.convert --from=hf_dinov2 --checkpoint=/data/dinov2-giant --out=/ckpt/dinov2_g14 \
      --input_size=224
  python -m launch.train --config=configs/fae_dinov2_g14.py --workdir=/runs/fae_head \
      --config.fae.dinov2_checkpoint=/ckpt/dinov2_g14 --config.data.name=folder --config.data.dir=...
  python -m launch.train --config=configs/fae_dinov2_g14.py:pixel_noisy --workdir=/runs/fae_pixA \
      --config.fae.dinov2_checkpoint=/ckpt/dinov2_g14 --config.fae.frozen_from=/runs/fae_head ...
  python -m launch.train --config=configs/fae_dinov2_g14.py:pixel_recon --workdir=/runs/fae_pixB \
      --config.fae.dinov2_checkpoint=/ckpt/dinov2_g14 --config.fae.frozen_from=/runs/fae_pixA \
      --config.init_from=/runs/fae_pixA ...

The argument after ':' is fae.phase (default head).
"""
import ml_collections

from starflow2_jax.train.defaults import base_config

IMAGE_SIZE = 256  # STARFlow2 images
ENCODER_SIZE = 224  # resized for DINOv2's 14-px patches: a 16 x 16 grid
DINOV2_G14 = {  # facebook/dinov2-giant (CHECKPOINT-LAYOUTS.md c.1)
    "hidden_size": 1536, "num_layers": 40, "num_heads": 24, "patch_size": 14, "image_size": 518,
    "input_size": [ENCODER_SIZE, ENCODER_SIZE], "mlp": "swiglu", "mlp_ratio": 4.0,
    "layer_norm_eps": 1e-6, "layerscale_value": 1.0, "qkv_bias": True, "num_registers": 0,
    "num_channels": 3,
}


def fae_config(phase: str = "head") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "image_size": IMAGE_SIZE,
      "latent_channels": 32,
      "dinov2": dict(DINOV2_G14),
      "dinov2_checkpoint": "",
      "train_encoder": False,
      "head_heads": 24,
      "head_dim": 256,
      "decoder": {"width": 1536, "layers": 6, "heads": 24, "head_dim": 64, "mlp_hidden": 4096,
                  "norm_eps": 1e-6, "rope_base": 10000.0},
      "pixel": {"width": 1024, "layers": 24, "heads": 16, "head_dim": 64, "mlp_hidden": 4096,
                "norm_eps": 1e-6, "rope_base": 10000.0},
      "beta_kl": 1e-4,
      "logvar_offset": 0.0,
      "pixel_noise": 0.4,
      "phase": phase,
      "frozen_from": "",
      "stats_images": 10_000,
      "dtype": "bfloat16",
      "attention_impl": "auto",
      "remat": "dots_saveable",
  })


def get_config(arg=None):
  config = base_config()
  config.model_kind = "fae"
  config.fae = fae_config(arg or "head")
  config.data.name = "folder"
  config.data.image_size = IMAGE_SIZE
  config.data.channels = 3
  config.train.batch_size = 256
  config.train.steps = 100_000
  config.train.lr = 1e-4
  config.train.warmup = 5_000
  config.mesh.shape = {"data": -1, "fsdp": 1, "tensor": 1}
  config.log.num_samples = 16
  return config
