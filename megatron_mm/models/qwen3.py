"""Qwen3 dense (0.6B-32B): the Llama layout plus RMSNorm on queries and keys (QK-norm), a head
dimension decoupled from hidden_size / heads, and tied embeddings in the small sizes."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mm.models.base import DecoderConfig


@dataclass
class Qwen3Config(DecoderConfig):
    family: str = "qwen3"
    rotary_base: float = 1000000.0
    norm_epsilon: float = 1e-6

    def family_transformer_fields(self) -> dict:
        return {"qk_layernorm": True}


CONFIG_CLASS = Qwen3Config
