"""TarFlow AFHQ-256, class-conditional: the public apple/ml-tarflow release (afhq_model_8_768_8_8_0.07).

8 blocks x 8 layers, width 768, patch 8 (1024 tokens of 192 channels), 3 classes (cat, dog, wild),
noise sigma 0.07, label drop 0.1. Import the published weights and sample:
  python -m launch.convert --from=tarflow_torch --checkpoint=afhq_model_8_768_8_8_0.07.pth \
      --out=/ckpt/tarflow_afhq256 --config=configs/tarflow_afhq256.py
  python -m launch.sample --checkpoint=/ckpt/tarflow_afhq256 --num=8 --labels=0,1,2 --guidance=1 \
      --denoise --out=/tmp/afhq_samples
"""
import ml_collections


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.model_kind = "flow"
  config.model = dict(
      image_size=256, channels=3, patch_size=8, layout="tarflow", parametrisation="tarflow",
      width=768, head_dim=64, mlp_ratio=4, layers_per_block=[8] * 8, permutation_rule="tarflow",
      conditioning="all", num_classes=3, label_drop=0.1, positions="learned", noise_std=0.07,
      dequant="gaussian", dtype="float32", param_dtype="float32")
  # The public notebook's recipe: TarFlow's linear rule, not annealed; one score-denoising step.
  config.sample = dict(guidance=1.0, guidance_rule="linear", cfg_anneal=False, attn_temp=1.0,
                       denoise=True)
  return config
