"""Qwen2.5-VL-3B (Instruct) shapes (tied embeddings, 2 KV heads).

  python -m launch.convert --from=hf_qwen2_5_vl --checkpoint=/data/Qwen2.5-VL-3B-Instruct \
      --out=/ckpt/qwen2_5_vl_3b --config=configs/qwen2_5_vl_3b.py
  python -m launch.sample --checkpoint=/ckpt/qwen2_5_vl_3b --tokenizer=qwen2.5 --prompt="Hello"
"""
from configs.qwen2_5_vl_7b import TOKENS, VISION
from starflow2_jax.vlm.config import experiment_config


def get_config(arg=None):
  del arg
  model = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
               num_heads=16, num_kv_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
               mrope_section=[16, 24, 24], tie_word_embeddings=True, max_position_embeddings=128000,
               dtype="bfloat16", param_dtype="bfloat16", image_positions="mrope", **TOKENS)
  return experiment_config(model, dict(VISION, out_hidden_size=2048))
