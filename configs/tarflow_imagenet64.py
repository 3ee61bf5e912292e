"""TarFlow on ImageNet 64x64, class-conditional: the paper's recipe (STARFLOW2.md 8.1), for TPU pods.

  python -m launch.train --config=configs/tarflow_imagenet64.py --workdir=gs://BUCKET/tarflow64 \
      --config.data.data_dir=/path/to/tensorflow_datasets

The data is tfds `imagenet_resized/64x64`, prepared by you in array_record format in data.data_dir
(`tfds build imagenet_resized/64x64 --file_format=array_record`; ImageNet needs a manual download).
8 blocks x 8 layers, width 768, head_dim 64, patch 2 (1024 tokens of 12), sigma 0.05, batch 256,
AdamW (0.9, 0.95) lr 1e-4 wd 1e-4, warm-up one epoch from 1e-6 then cosine to 1e-6, 200 epochs, label
drop 0.1, no gradient clipping, no EMA. About 453M parameters (N K 12 d^2), sharded FSDP over every chip.
For the bits/dim model use --config.model.dequant=uniform --config.model.num_classes=0.
"""
import ml_collections

from starflow2_jax.train.defaults import base_config

IMAGE_SIZE = 64
CHANNELS = 3
IMAGENET_TRAIN_IMAGES = 1_281_167
BATCH = 256
EPOCHS = 200


def get_config(arg=None):
  del arg
  config = base_config()
  config.model_kind = "flow"
  config.model = ml_collections.ConfigDict({
      "image_size": IMAGE_SIZE,
      "channels": CHANNELS,
      "patch_size": 2,
      "layout": "tarflow",
      "parametrisation": "tarflow",
      "width": 768,
      "head_dim": 64,
      "mlp_ratio": 4,
      "layers_per_block": [8] * 8,
      "num_classes": 1000,
      "label_drop": 0.1,
      "noise_std": 0.05,
      "dequant": "gaussian",
      "dtype": "bfloat16",  # trunk compute; the flow maths and every loss reduction stay float32
      "attention_impl": "auto",  # the platform's kernel: cpu on CPU, cuDNN on GPU, XLA on TPU
      "remat": "full",
  })
  config.data.name = "tfds"
  config.data.tfds_name = "imagenet_resized/64x64"
  config.data.data_dir = ""  # required: where the array_record dataset was prepared
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.image_size = IMAGE_SIZE
  config.data.channels = CHANNELS
  config.data.flip = True
  config.data.worker_count = 8
  config.data.prefetch = 4
  steps_per_epoch = IMAGENET_TRAIN_IMAGES // BATCH
  config.train.batch_size = BATCH
  config.train.steps = EPOCHS * steps_per_epoch
  config.train.warmup = steps_per_epoch
  config.train.lr = 1e-4
  config.train.clip_norm = 0.0
  config.mesh.shape = {"data": 1, "fsdp": -1, "tensor": 1}
  config.checkpoint.every = 2000
  config.checkpoint.keep = 3
  config.log.every = 100
  config.log.sample_every = 10_000
  config.log.num_samples = 64
  config.sample.guidance = 2.3
  config.log.eval_examples = 10_000
  return config
