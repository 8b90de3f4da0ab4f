"""A vision-language Mixture-of-Experts model: the Qwen2-VL native-resolution encoder and M-RoPE
(models/qwen2_vl.py) in front of a Qwen3-MoE decoder (QK-norm GQA attention, routed experts; every
MoE field of models/moe_decoder.py). Encoders sit on the first pipeline stage as for dense decoders;
experts split over parallel.ep. No HuggingFace architecture has this exact shape, so there is no
mapping: start it from a Qwen2-VL vision tower and a Qwen3-MoE decoder trained separately, or from
scratch."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mm.models.layers.moe_decoder import MoEDecoderConfig
from megatron_mm.models.qwen2_vl import Qwen2VLConfig


@dataclass
class Qwen2VLMoEConfig(Qwen2VLConfig, MoEDecoderConfig):
    family: str = "qwen2_vl_moe"
    num_experts: int = 128
    router_topk: int = 8

    HF_ARCHITECTURES = ()

    def family_transformer_fields(self) -> dict:
        return {**MoEDecoderConfig.family_transformer_fields(self), "qk_layernorm": True,
                "mrope_section": list(self.mrope_section)}

    @classmethod
    def from_hf_config(cls, hf: dict):
        from megatron_mm.checkpoint.hf_rules import HFConversionError

        raise HFConversionError("model.family=qwen2_vl_moe has no HuggingFace mapping")

    def to_hf_config(self) -> dict:
        return self.from_hf_config({})

    def hf_rules(self) -> list:
        return self.from_hf_config({})


CONFIG_CLASS = Qwen2VLMoEConfig
