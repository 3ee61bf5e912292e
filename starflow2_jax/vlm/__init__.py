"""Qwen2.5-VL: language model, vision tower, M-RoPE positions, tokenizer, cached generation."""
