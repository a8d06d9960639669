"""Reusable layers: attention maths as pure functions (``attention``) and the SAFormer modules."""

from ifnet.layers.attention import (
    causal_linear_attention,
    causal_linear_attention_chunked,
    elu_feature_map,
    init_linear_state,
    linear_attention,
    linear_attention_readout,
    linear_attention_step,
    linear_attention_summary,
    softmax_attention,
    softmax_attention_step,
)
from ifnet.layers.saformer import (
    DecoderState,
    SAFormerConfig,
    SAFormerDecoder,
    SAFormerEncoder,
    sinusoidal_positions,
)

__all__ = [
    "DecoderState",
    "SAFormerConfig",
    "SAFormerDecoder",
    "SAFormerEncoder",
    "causal_linear_attention",
    "causal_linear_attention_chunked",
    "elu_feature_map",
    "init_linear_state",
    "linear_attention",
    "linear_attention_readout",
    "linear_attention_step",
    "linear_attention_summary",
    "sinusoidal_positions",
    "softmax_attention",
    "softmax_attention_step",
]
