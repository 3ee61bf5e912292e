"""A tiny random Qwen2.5-VL (the shapes of CHECKPOINT-LAYOUTS.md §d), used by the tests.

The tests build the same model in Hugging Face transformers, save it, and import it:
  python -m launch.convert --from=hf_qwen2_5_vl --checkpoint=/tmp/tiny_hf --out=/tmp/tiny \
      --config=configs/qwen2_5_vl_tiny.py
"""
from starflow2_jax.vlm.config import experiment_config


def get_config(arg=None):
  del arg
  model = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
               num_kv_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, mrope_section=[2, 3, 3],
               tie_word_embeddings=False, max_position_embeddings=32768, dtype="float32",
               param_dtype="float32", image_positions="mrope", image_token_id=250,
               video_token_id=251, vision_start_token_id=252, vision_end_token_id=253,
               bos_token_id=1, eos_token_id=[2], pad_token_id=0)
  vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                fullatt_block_indexes=[1], in_channels=3, tokens_per_second=2, rope_theta=10000.0)
  return experiment_config(model, vision)
