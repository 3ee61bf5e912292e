"""Class-conditional TarFlow on scikit-learn's digits, upsampled to 16x16 (trains in minutes on 2 CPU cores).

  python -m launch.train --config=configs/tarflow_digits.py --workdir=/tmp/digits

Writes checkpoints, TensorBoard logs, sample grids (WORKDIR/samples/*.png) and the held-out bits/dim
(WORKDIR/eval_*.json). Override any field: --config.train.steps=500 --config.model.width=64.
"""
import ml_collections

from starflow2_jax.train.defaults import base_config

IMAGE_SIZE = 16
CHANNELS = 1


def get_config(arg=None):
  del arg
  config = base_config()
  config.model_kind = "flow"
  config.model = ml_collections.ConfigDict({
      "image_size": IMAGE_SIZE,
      "channels": CHANNELS,
      "patch_size": 4,  # 16 tokens of 16 values
      "layout": "tarflow",
      "parametrisation": "tarflow",
      "width": 64,
      "head_dim": 32,
      "mlp_ratio": 4,
      "layers_per_block": [2, 2, 2, 2],
      "num_classes": 10,
      "label_drop": 0.1,
      "noise_std": 0.1,  # TarFlow's MNIST value
      "dequant": "gaussian",
      "dtype": "float32",
      "attention_impl": "auto",  # the platform's kernel: cpu on CPU, cuDNN on GPU, XLA on TPU
      "remat": "none",
  })
  config.data.name = "digits"
  config.data.image_size = IMAGE_SIZE
  config.data.channels = CHANNELS
  config.train.batch_size = 64
  config.train.steps = 2000
  config.train.lr = 2e-3  # TarFlow's MNIST notebook
  config.train.warmup = 100
  config.train.clip_norm = 1.0
  config.checkpoint.every = 500
  config.checkpoint.keep = 2
  config.log.every = 100
  config.log.sample_every = 1000
  config.log.num_samples = 40
  config.sample.guidance = 1.0
  return config
