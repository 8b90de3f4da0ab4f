"""Qwen3 dense (0.6B-32B): the Llama layout plus RMSNorm on queries and keys (QK-norm), a head
dimension decoupled from hidden_size / heads, and tied embeddings in the small sizes."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mm.checkpoint import hf_rules
from megatron_mm.models.layers.decoder import DecoderConfig


@dataclass
class Qwen3Config(DecoderConfig):
    family: str = "qwen3"
    rotary_base: float = 1000000.0
    norm_epsilon: float = 1e-6

    def family_transformer_fields(self) -> dict:
        return {"qk_layernorm": True}

    # ---- HuggingFace mapping ------------------------------------------------------------------
    HF_ARCHITECTURES = ("Qwen3ForCausalLM",)

    @classmethod
    def from_hf_config(cls, hf: dict) -> "Qwen3Config":
        problems: list[str] = []
        hf_rules.check_dense_decoder(hf, problems)
        hf_rules.check_equal(hf, problems, "use_sliding_window", False, False)
        theta = hf_rules.plain_rope(hf, problems)
        hf_rules.unsupported("Qwen3ForCausalLM", problems)
        return cls(**hf_rules.decoder_fields_from_hf(hf), rotary_base=theta)

    def to_hf_config(self) -> dict:
        return {**hf_rules.decoder_fields_to_hf(self, "Qwen3ForCausalLM", "qwen3"),
                "rope_parameters": hf_rules.rope_parameters(self.rotary_base)}

    def hf_rules(self) -> list:
        return hf_rules.dense_decoder_rules(self, qk_norm=True)


CONFIG_CLASS = Qwen3Config
