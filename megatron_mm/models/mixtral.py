"""Mixtral 8x7B / 8x22B: the Mistral layout with 8 SwiGLU experts per layer, softmax over the top-2
router logits."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mm.models.moe_decoder import MoEDecoderConfig


@dataclass
class MixtralConfig(MoEDecoderConfig):
    family: str = "mixtral"
    rotary_base: float = 1000000.0
    num_experts: int = 8
    router_topk: int = 2


CONFIG_CLASS = MixtralConfig
