"""Qwen2.5-VL: Qwen2-VL (models/qwen2_vl.py) whose vision encoder has RMSNorm, a SwiGLU MLP and
windowed attention outside `vision_fullatt_block_indexes`; the language side is Qwen2-VL's."""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_mm.models.qwen2_vl import Qwen2VLConfig


@dataclass
class Qwen2_5_VLConfig(Qwen2VLConfig):
    family: str = "qwen2_5_vl"
    vision_fullatt_block_indexes: list[int] = field(default_factory=lambda: [1])

    VISION_VARIANT = "qwen2_5_vl"
    HF_ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration",)
    HF_MODEL_TYPE = "qwen2_5_vl"


CONFIG_CLASS = Qwen2_5_VLConfig
