"""Llama 3 / 3.1 / 3.2 / 3.3: RMSNorm, SwiGLU, grouped-query attention, RoPE with Llama 3 scaling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_mm.models.base import DecoderConfig


@dataclass
class LlamaConfig(DecoderConfig):
    family: str = "llama3"
    rotary_base: float = 500000.0
    # Llama 3.1+ frequency scaling (factor 8, low/high frequency factors 1 and 4, original context
    # 8192, as megatron-core's RotaryEmbedding applies it); None for Llama 3.0.
    rope_scaling_factor: Optional[float] = None

    def family_model_kwargs(self) -> dict:
        if self.rope_scaling_factor is None:
            return {}
        return {"rope_scaling": True, "rope_scaling_factor": self.rope_scaling_factor}


CONFIG_CLASS = LlamaConfig
