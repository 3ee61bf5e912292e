"""A tiny STARFlow2 on ShapesWorld (tiny random Qwen2.5-VL language model, tiny random FAE, the toy
tokenizer): the three stages run on 2 CPU cores in minutes; the tests use it.

  python -m launch.train --config=configs/starflow2_tiny.py:stage=1 --workdir=/tmp/s2_stage1
  python -m launch.train --config=configs/starflow2_tiny.py:stage=2 --workdir=/tmp/s2_stage2 \
      --config.init_from=/tmp/s2_stage1
  python -m launch.train --config=configs/starflow2_tiny.py:stage=3 --workdir=/tmp/s2_stage3 \
      --config.init_from=/tmp/s2_stage2

With a trained toy FAE (configs/fae_shapesworld.py exports one) set --config.fae.checkpoint=DIR (and
--config.fae.latent_channels / the grid to match it). Held-out latent NLL (nats/dim) and text CE are
written to WORKDIR/eval_*.json.
"""
import ml_collections

from configs import fae_shapesworld
from starflow2_jax.pretzel import examples, stages
from starflow2_jax.train.defaults import base_config
from starflow2_jax.train.pretzel_task import TOY_TOKENIZER, loss_defaults
from starflow2_jax.vlm.config import experiment_config

IMAGE_SIZE = 32
FAE_PATCH = 8  # a 4 x 4 latent grid
TOY_VOCAB = 512  # the toy tokenizer's vocabulary (pretzel.toy_tokenizer.DEFAULT_VOCAB)


def vlm_model() -> dict:
  """The tiny Qwen2.5-VL language model of REFERENCE-BEHAVIOURS.md, its vocabulary the toy tokenizer's."""
  return dict(vocab_size=TOY_VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
              num_kv_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, mrope_section=[2, 3, 3],
              tie_word_embeddings=False, max_position_embeddings=32768, dtype="float32",
              param_dtype="float32")


def fae_config() -> ml_collections.ConfigDict:
  fae = fae_shapesworld.fae_config()
  fae.latent_channels = 4
  fae.dinov2.update({"hidden_size": 32, "num_layers": 1, "num_heads": 2, "patch_size": FAE_PATCH})
  fae.head_heads, fae.head_dim = 2, 16
  fae.decoder.update({"width": 32, "layers": 1, "heads": 2, "head_dim": 16, "mlp_hidden": 64})
  fae.pixel.update({"width": 32, "layers": 1, "heads": 2, "head_dim": 16, "mlp_hidden": 64})
  fae.checkpoint = ""  # a trained FAE (fae.load_fae); "": random, identity latent statistics
  return fae


def get_config(arg=None):
  config = base_config()
  config.model_kind = "starflow2"
  config.tokenizer = TOY_TOKENIZER
  config.vlm = ml_collections.ConfigDict({
      "checkpoint": "", "image_positions": "mrope",
      "model": experiment_config(vlm_model(), None).model})
  config.fae = fae_config()
  config.model = ml_collections.ConfigDict({
      "width": 32, "head_dim": 16, "mlp_ratio": 4, "deep_layers": 2, "shallow_blocks": 2,
      "shallow_layers": 1, "latent_patch": 1, "noise_std": 0.3, "deep_rope": "mrope",
      "deep_rope_sections": [2, 3, 3], "adapter_hidden": 64, "skip_taps": (),
      "stage1_vlm_prefix": 0, "dtype": "float32", "param_dtype": "float32",
      "attention_impl": "auto", "remat": "none"})
  config.loss = loss_defaults()
  config.data = examples.default_data_config()
  config.data.image_size = IMAGE_SIZE
  config.data.max_len = 96
  config.data.max_images = 2
  config.data.shapes_num_train = 2000
  config.data.shapes_num_test = 64
  config.train.batch_size = 8
  config.train.steps = 200
  config.train.lr = 1e-3
  config.train.warmup = 20
  config.checkpoint.every = 100
  config.checkpoint.keep = 1
  config.log.every = 20
  config.log.num_samples = 0
  config.log.eval_examples = 64
  return stages.apply_stage(config, stages.stage_from_arg(arg))
