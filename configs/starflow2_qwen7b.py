"""STARFlow2 as in the paper (STARFLOW2.md 8.3): frozen Qwen2.5-VL-7B-Instruct language model (bf16),
frozen FAE on DINOv2-g/14 (256 px, 16 x 16 x 32 latents), flow width 3072 (48 heads of 64), deep
stream 24 layers, shallow 2 x 4, ~3.6B trainable parameters. The stage is the config argument; each
stage warm-starts from the previous one:

  python -m launch.convert --from=hf_qwen2_5_vl --checkpoint=/data/Qwen2.5-VL-7B-Instruct \
      --out=/ckpt/qwen2_5_vl_7b --config=configs/qwen2_5_vl_7b.py
  python -m launch.train --config=configs/starflow2_qwen7b.py:stage=1 --workdir=/runs/s2_stage1 \
      --config.vlm.checkpoint=/ckpt/qwen2_5_vl_7b --config.fae.checkpoint=/runs/fae_pixB \
      --config.data.examples_from=folder --config.data.dir=/data/t2i
  python -m launch.train --config=configs/starflow2_qwen7b.py:stage=2 --workdir=/runs/s2_stage2 \
      --config.init_from=/runs/s2_stage1 ...   (captioning / VQA data)
  python -m launch.train --config=configs/starflow2_qwen7b.py:stage=3 --workdir=/runs/s2_stage3 \
      --config.init_from=/runs/s2_stage2 ...   (mixed data)

Mesh: tensor 4, FSDP over the remaining devices (64 devices: fsdp 16); batch 1024 in 16 micro-batches.
`python -m launch.compile --config=configs/starflow2_qwen7b.py:stage=3 --topology=v5p-64` (32 chips):
19.7 GiB per chip of 95, compiled / analytical FLOPs 1.20. The logical rules are the project's table
(`parallel.DEFAULT_LOGICAL_RULES`: weights' embed over fsdp, mlp / heads / vocab over tensor; the batch
over data x fsdp).
"""
import ml_collections

from configs import fae_dinov2_g14, qwen2_5_vl_7b
from starflow2_jax.pretzel import examples, stages
from starflow2_jax.train.defaults import base_config
from starflow2_jax.train.pretzel_task import loss_defaults


def get_config(arg=None):
  config = base_config()
  config.model_kind = "starflow2"
  config.tokenizer = "qwen2.5"
  vlm = qwen2_5_vl_7b.get_config()
  config.vlm = ml_collections.ConfigDict({
      "checkpoint": "",  # a converted Qwen2.5-VL-7B-Instruct (launch.convert); "": random (shapes only)
      "image_positions": "mrope",
      "model": vlm.model})
  # the frozen VLM stream's remat: gradients pass through it (to the adapter and shallow blocks), so
  # its activations would be kept; recomputing each layer is what fits a pod (launch.compile)
  config.vlm.model.remat = "full"
  config.fae = fae_dinov2_g14.fae_config()
  config.fae.checkpoint = ""  # the trained FAE (configs/fae_dinov2_g14.py, its pixel_recon export)
  config.model = ml_collections.ConfigDict({
      "width": 3072, "head_dim": 64, "mlp_ratio": 4, "deep_layers": 24, "shallow_blocks": 2,
      "shallow_layers": 4, "latent_patch": 1, "noise_std": 0.3, "deep_rope": "mrope",
      "deep_rope_sections": [8, 12, 12], "adapter_hidden": 3584, "skip_taps": (),
      "stage1_vlm_prefix": 0, "dtype": "bfloat16", "param_dtype": "float32",
      "attention_impl": "auto", "remat": "dots_saveable"})
  config.loss = loss_defaults()
  config.data = examples.default_data_config()
  config.data.examples_from = "folder"
  config.data.image_size = fae_dinov2_g14.IMAGE_SIZE
  config.data.max_len = 1024
  config.data.max_images = 2
  config.train.batch_size = 1024
  config.train.steps = 100_000
  config.train.lr = 6.4e-5
  config.train.warmup = 5_000
  config.train.clip_norm = 1.0
  config.train.grad_accum = 16  # micro-batches of 64 rows: stage 3 fits a v5p-64 (launch.compile)
  config.mesh.shape = {"data": 1, "fsdp": -1, "tensor": 4}
  config.checkpoint.every = 2000
  config.log.every = 100
  config.log.num_samples = 0
  config.log.eval_examples = 1024
  return stages.apply_stage(config, stages.stage_from_arg(arg))
