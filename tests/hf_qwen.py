"""Tiny random Hugging Face Qwen2.5-VL models for the parity tests (CHECKPOINT-LAYOUTS.md §d).

Built on the fly (nothing downloaded, no binary fixtures): seeded, every parameter randomised
(weights N(0, 0.1^2), norm weights 1 + N(0, 0.1^2), non-zero biases).
"""
import numpy as np

VARIANTS = {
    # grouped-query ratio 2, untied head, window attention in block 0 (window 56 px = 2x2 merged cells)
    "gqa_untied": dict(),
    "tied": dict(tie_word_embeddings=True),
    # no window attention: every vision block is a full-attention block
    "full_attn": dict(fullatt_block_indexes=[0, 1], num_kv_heads=1),
}


def hf_config(variant: str):
  from transformers import Qwen2_5_VLConfig
  v = dict(VARIANTS[variant])
  tied = v.pop("tie_word_embeddings", False)
  return Qwen2_5_VLConfig(
      text_config=dict(
          vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=v.get("num_kv_heads", 2), rms_norm_eps=1e-6,
          rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]),
          bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tied),
      vision_config=dict(
          depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
          fullatt_block_indexes=v.get("fullatt_block_indexes", [1]), tokens_per_second=2),
      image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253,
      tie_word_embeddings=tied)


def build(variant: str, seed: int = 0, embed_std: float = 0.1):
  """embed_std: std of the embedding and head weights (larger -> less repetitive greedy text)."""
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(hf_config(variant)).eval()
  rng = np.random.default_rng(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      std = embed_std if "embed_tokens" in name or "lm_head" in name else 0.1
      noise = torch.from_numpy(rng.normal(0.0, std, tuple(p.shape)).astype(np.float32))
      is_norm = "norm" in name or "ln_q" in name
      p.copy_(1.0 + noise if is_norm else noise)  # norm weights: 1 + N(0, 0.1^2)
  return model


def hf_positions(model, input_ids, attention_mask, grids_thw):
  """HF get_rope_index with mm_token_type_ids (transformers 5) -> (3, B, L) numpy."""
  import torch
  ids = torch.as_tensor(input_ids)
  mm = (ids == model.config.image_token_id).int()
  pos, _ = model.model.get_rope_index(
      ids, mm_token_type_ids=mm,
      image_grid_thw=torch.as_tensor(grids_thw) if len(grids_thw) else None,
      attention_mask=torch.as_tensor(attention_mask))
  return pos.numpy()


TINY_SPECIALS = {0: "<|endoftext|>", 1: "<|im_start|>", 2: "<|im_end|>", 250: "<|image_pad|>",
                 251: "<|video_pad|>", 252: "<|vision_start|>", 253: "<|vision_end|>"}


def tiny_tokenizer_json(path: str) -> str:
  """A 256-id character-level tokenizer with the Qwen chat specials at the tiny model's ids."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
  vocab = {f"<unused_{i}>": i for i in range(256)}
  for i in [10] + list(range(32, 127)):
    del vocab[f"<unused_{i}>"]
    vocab[chr(i)] = i
  for i, t in TINY_SPECIALS.items():
    del vocab[f"<unused_{i}>"]
    vocab[t] = i
  tk = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
  tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
  tk.decoder = decoders.Fuse()
  tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                         for _, t in sorted(TINY_SPECIALS.items())])
  tk.save(path)
  return path
