"""Qwen2.5-VL-7B (Instruct) shapes: the frozen understanding stream of STARFlow2.

Import the published weights (a local Hugging Face directory) and chat with them:
  python -m launch.convert --from=hf_qwen2_5_vl --checkpoint=/data/Qwen2.5-VL-7B-Instruct \
      --out=/ckpt/qwen2_5_vl_7b --config=configs/qwen2_5_vl_7b.py
  python -m launch.sample --checkpoint=/ckpt/qwen2_5_vl_7b --tokenizer=qwen2.5 --prompt="Hello"
"""
from starflow2_jax.vlm.config import experiment_config

VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
              temporal_patch_size=2, spatial_merge_size=2, window_size=112,
              fullatt_block_indexes=[7, 15, 23, 31], in_channels=3, tokens_per_second=2,
              rope_theta=10000.0)

TOKENS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
              vision_end_token_id=151653, bos_token_id=151643, eos_token_id=[151645],
              pad_token_id=None)


def get_config(arg=None):
  del arg
  model = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
               num_heads=28, num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1e6,
               mrope_section=[16, 24, 24], tie_word_embeddings=False, max_position_embeddings=128000,
               dtype="bfloat16", param_dtype="bfloat16", image_positions="mrope", **TOKENS)
  return experiment_config(model, dict(VISION, out_hidden_size=3584))
