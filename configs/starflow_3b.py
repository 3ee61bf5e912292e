"""A STARFlow-3B-class flow (STARFLOW2.md 8.2): the trunk of STARFlow's 3.8B text-to-image model,
trained by the flow task with class labels, for pod-scale planning and training on latents.

  python -m launch.compile --config=configs/starflow_3b.py --topology=v5p-64
  python -m launch.train --config=configs/starflow_3b.py --workdir=gs://BUCKET/starflow3b \
      --config.data.tfds_name=YOUR_LATENTS --config.data.data_dir=/path/to/tensorflow_datasets

Deep-shallow stack: width 3072 (48 heads of 64), layers [2, 2, 2, 2, 2, 24] (five 2-layer shallow
blocks, one 24-layer deep block), STARFlow parametrisation (SOS token, softplus scale, soft clip 4),
2-D RoPE, the 3B config's left-to-right order (`starflow_l2r`), MLP 4x: about 3.85B parameters.
The data are SD-VAE latents of 256-px images, 32 x 32 x 4, stored as uint8 images of that shape
(patch 1: 1024 tokens of 4 channels), noise sigma 0.3. The flow task has no text encoder: the
FLAN-T5 prefix of the text-to-image model is replaced by class conditioning of the deep block (1000
classes, drop 0.1 for guidance), as in STARFlow's 1.4B ImageNet model. AdamW (0.9, 0.95), lr 6.4e-5,
wd 1e-4, global batch 1024, no clipping, latent-norm regulariser 1e-4, bf16 trunk with full remat,
FSDP over every chip.
"""
import ml_collections

from starflow2_jax.train.defaults import base_config

LATENT_SIDE = 32  # 256 px / the SD-VAE's factor 8
LATENT_CHANNELS = 4
BATCH = 1024
TRAIN_IMAGES = 1_281_167  # one ImageNet epoch per warm-up (the class-conditional setting)


def get_config(arg=None):
  del arg
  config = base_config()
  config.model_kind = "flow"
  config.model = ml_collections.ConfigDict({
      "image_size": LATENT_SIDE,
      "channels": LATENT_CHANNELS,
      "patch_size": 1,
      "layout": "starflow",
      "parametrisation": "starflow",
      "width": 3072,
      "head_dim": 64,
      "mlp_ratio": 4,
      "layers_per_block": [2, 2, 2, 2, 2, 24],
      "permutation_rule": "starflow_l2r",
      "conditioning": "deep",
      "num_classes": 1000,
      "label_drop": 0.1,
      "positions": "rope2d",
      "soft_clip": 4.0,
      "noise_std": 0.3,
      "dequant": "gaussian",
      "latent_norm_reg": 1e-4,
      "dtype": "bfloat16",  # trunk compute; the flow maths and every loss reduction stay float32
      "attention_impl": "auto",
      "remat": "full",
  })
  config.data.name = "tfds"
  config.data.tfds_name = ""  # required: a dataset of 32x32x4 uint8 latents with labels
  config.data.data_dir = ""
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.image_size = LATENT_SIDE
  config.data.channels = LATENT_CHANNELS
  config.data.worker_count = 8
  config.data.prefetch = 4
  config.train.batch_size = BATCH
  config.train.steps = 1_000_000
  config.train.warmup = TRAIN_IMAGES // BATCH
  config.train.lr = 6.4e-5
  config.train.clip_norm = 0.0
  config.mesh.shape = {"data": 1, "fsdp": -1, "tensor": 1}
  config.checkpoint.every = 2000
  config.log.every = 100
  config.log.sample_every = 10_000
  config.log.num_samples = 16
  config.log.eval_examples = 10_000
  config.sample.guidance = 3.6
  config.sample.guidance_rule = "gaussian"
  return config
