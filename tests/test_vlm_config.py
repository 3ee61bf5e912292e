"""configs/qwen2_5_vl_7b.py agrees with the published config.json (flat, pre-transformers-5 layout:
text fields at the top level, rope_scaling, in_chans), and the model builds at the real shapes."""
import flax.linen as nn
import jax
import pytest

from starflow2_jax.errors import UserError
from configs import qwen2_5_vl_3b, qwen2_5_vl_7b
from starflow2_jax.convert.hf_qwen2_5_vl import check_same_model, config_from_hf
from starflow2_jax.vlm.model import QwenConfig, abstract_params

# Qwen/Qwen2.5-VL-7B-Instruct config.json (as published on the Hub).
HUB_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
    "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 128000, "max_window_layers": 28,
    "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2",
    "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064,
}


def test_7b_config_matches_the_hub_config():
  derived = config_from_hf(HUB_7B, "bfloat16")
  check_same_model(qwen2_5_vl_7b.get_config(), derived, "hub")
  assert derived.model.mrope_section == [16, 24, 24] and derived.model.vision.in_channels == 3


def test_real_shapes_and_parameter_counts():
  """CL §b.3: 7,615,616,512 language-model and 676,550,144 vision-tower parameters (7B)."""
  cfg = QwenConfig.from_config(qwen2_5_vl_7b.get_config().model)
  params = nn.unbox(abstract_params(cfg))
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count({k: v for k, v in params.items() if k != "visual"}) == 7_615_616_512
  assert count(params["visual"]) == 676_550_144
  assert params["layers"]["stack"]["attn"]["k"]["kernel"].shape == (28, 3584, 512)  # stacked layers
  cfg3 = QwenConfig.from_config(qwen2_5_vl_3b.get_config().model)
  assert cfg3.tie_word_embeddings and cfg3.head_dim == 2 * sum(cfg3.mrope_section) == 128


def test_sliding_window_and_bad_sections_are_refused():
  with pytest.raises(ValueError, match="use_sliding_window"):
    config_from_hf(dict(HUB_7B, use_sliding_window=True), "bfloat16")
  with pytest.raises(ValueError,
                     match=r"mrope_section must sum to head_dim/2 = 64, found \[16, 24, 16\]"):
    config_from_hf(dict(HUB_7B, rope_scaling={"mrope_section": [16, 24, 16]}), "bfloat16")


@pytest.mark.parametrize("section", ["model", "vision"])
def test_unknown_model_fields_are_refused(section):
  """A mistyped field is a UserError naming it and the known fields, never silently dropped."""
  config = qwen2_5_vl_7b.get_config()
  target = config.model if section == "model" else config.model.vision
  target.num_layerz = 3
  where = "config.model" if section == "model" else "config.model.vision"
  with pytest.raises(UserError, match=rf"{where}: unknown field\(s\) \['num_layerz'\]; the known "
                                      r"fields are \[.*'hidden_size'"):
    QwenConfig.from_config(config.model)
