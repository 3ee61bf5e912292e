"""Neural-network pieces shared by the flow, VLM and FAE streams."""
from starflow2_jax.nn.attention import KVCache, Transformer, TransformerConfig, causal_mask
from starflow2_jax.nn.layers import Dense, LayerNorm, Mlp, RMSNorm, check_shape
from starflow2_jax.nn.rope import RopeSpec, apply_rope, mrope, rope_1d, starflow_2d

__all__ = ["KVCache", "Transformer", "TransformerConfig", "causal_mask", "Dense", "LayerNorm", "Mlp",
           "RMSNorm", "check_shape", "RopeSpec", "apply_rope", "mrope", "rope_1d", "starflow_2d"]
