"""Mistral 7B (v0.1 with 4096-token sliding-window attention; v0.2+/v0.3 with full attention) and
Mistral NeMo / Small: the Llama architecture with its own rotary base and optional windows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_mm.models.base import DecoderConfig


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


CONFIG_CLASS = MistralConfig
