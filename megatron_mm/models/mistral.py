"""Mistral 7B (v0.1 with 4096-token sliding-window attention; v0.2+/v0.3 with full attention) and
Mistral NeMo / Small: the Llama architecture with its own rotary base and optional windows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_mm.checkpoint import hf_rules
from megatron_mm.models.layers.decoder import DecoderConfig


@dataclass
class MistralConfig(DecoderConfig):
    family: str = "mistral"
    rotary_base: float = 1000000.0
    sliding_window: Optional[int] = None  # tokens each query sees, itself included; None = full

    def family_transformer_fields(self) -> dict:
        if self.sliding_window is None:
            return {}
        # megatron-core's window is (left, right) in tokens beside the query itself.
        return {"window_size": (self.sliding_window - 1, 0)}

    # ---- HuggingFace mapping ------------------------------------------------------------------
    HF_ARCHITECTURES = ("MistralForCausalLM",)

    @classmethod
    def from_hf_config(cls, hf: dict) -> "MistralConfig":
        problems: list[str] = []
        hf_rules.check_dense_decoder(hf, problems)
        theta = hf_rules.plain_rope(hf, problems)
        hf_rules.unsupported("MistralForCausalLM", problems)
        # transformers' window counts the query itself, as ours does
        return cls(**hf_rules.decoder_fields_from_hf(hf), rotary_base=theta, sliding_window=hf.get("sliding_window"))

    def to_hf_config(self) -> dict:
        return {**hf_rules.decoder_fields_to_hf(self, "MistralForCausalLM", "mistral"),
                "rope_parameters": hf_rules.rope_parameters(self.rotary_base), "sliding_window": self.sliding_window}

    def hf_rules(self) -> list:
        return hf_rules.dense_decoder_rules(self, qk_norm=False)


CONFIG_CLASS = MistralConfig
