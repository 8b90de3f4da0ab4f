"""Qwen2-VL and Qwen2.5-VL: the native-resolution vision encoder of models/qwen2_vl_vision.py in front
of a Qwen2 decoder (the Llama layout with q/k/v biases, rotary base 1e6) whose rotary embedding is
M-RoPE: each head's frequencies are split in `mrope_section` parts turned by a token's temporal, row
and column position. Text positions advance all three together; an image's placeholders take their
merged patch grid (data/qwen2_vl_processing.py).

The config is the language model's (flat, DecoderConfig fields) plus `vision_*` fields. One
placeholder token (`image_token_id`) per merged 2x2 patch group; videos are images with more than one
temporal patch and use the same token here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_mm.checkpoint import hf_rules
from megatron_mm.models.layers.decoder import DecoderConfig
from megatron_mm.models.multimodal import MultimodalFamily
from megatron_mm.models.encoders.qwen2_vl_vision import (
    Qwen2VLImageEncoder,
    Qwen2VLVisionConfig,
    vision_config_from_hf,
    vision_config_to_hf,
    visual_hf_rules,
)


@dataclass
class Qwen2VLConfig(MultimodalFamily, DecoderConfig):
    family: str = "qwen2_vl"
    rotary_base: float = 1000000.0
    norm_epsilon: float = 1e-6
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])  # temporal, row, column; sums to head_dim / 2
    image_token_id: int = -1  # a vocabulary id reserved for image placeholders (required)
    video_token_id: int = -1  # kept for the HuggingFace config; videos use image_token_id here
    vision_depth: int = 2
    vision_hidden_size: int = 64
    vision_num_heads: int = 4
    vision_ffn_hidden_size: int = 256
    vision_patch_size: int = 14
    vision_temporal_patch_size: int = 2
    vision_spatial_merge_size: int = 2
    vision_rotary_base: float = 10000.0
    vision_window_size: int = 112  # Qwen2.5-VL
    vision_fullatt_block_indexes: list[int] = field(default_factory=list)  # Qwen2.5-VL
    vision_min_pixels: int = 56 * 56  # images are resized into this pixel budget
    vision_max_pixels: int = 28 * 28 * 1280

    VISION_VARIANT = "qwen2_vl"
    HF_ARCHITECTURES = ("Qwen2VLForConditionalGeneration",)
    HF_MODEL_TYPE = "qwen2_vl"

    def vision(self) -> Qwen2VLVisionConfig:
        return Qwen2VLVisionConfig(
            variant=self.VISION_VARIANT,
            depth=self.vision_depth,
            hidden_size=self.vision_hidden_size,
            num_heads=self.vision_num_heads,
            ffn_hidden_size=self.vision_ffn_hidden_size,
            out_hidden_size=self.hidden_size,
            patch_size=self.vision_patch_size,
            temporal_patch_size=self.vision_temporal_patch_size,
            spatial_merge_size=self.vision_spatial_merge_size,
            rotary_base=self.vision_rotary_base,
            window_size=self.vision_window_size,
            fullatt_block_indexes=tuple(self.vision_fullatt_block_indexes),
        )

    # ---- language model ------------------------------------------------------------------------
    def family_transformer_fields(self) -> dict:
        return {"add_qkv_bias": True, "mrope_section": list(self.mrope_section)}

    def family_model_kwargs(self) -> dict:
        return {"position_embedding_type": "mrope"}

    # ---- MultimodalFamily ----------------------------------------------------------------------
    def placeholder_ids(self) -> dict[str, int]:
        return {"image": self.image_token_id}

    def media_processors(self) -> dict:
        from megatron_mm.data.qwen2_vl_processing import Qwen2VLImageProcessor

        return {"image": Qwen2VLImageProcessor(
            patch_size=self.vision_patch_size, temporal_patch_size=self.vision_temporal_patch_size,
            merge_size=self.vision_spatial_merge_size, min_pixels=self.vision_min_pixels,
            max_pixels=self.vision_max_pixels)}

    def position_ids(self, tokens: torch.Tensor, media: dict) -> torch.Tensor:
        from megatron_mm.data.qwen2_vl_processing import mrope_position_ids

        return mrope_position_ids(tokens, media.get("image_grid_thw"), self.image_token_id,
                                  self.vision_spatial_merge_size)

    def build_encoders(self, transformer_config, backend) -> dict[str, torch.nn.Module]:
        return {"image": Qwen2VLImageEncoder(self.vision(), transformer_config, backend)}

    def encoder_counts(self) -> dict:
        return {"image": self.vision().counts(self.vision_max_pixels)}

    def validate(self, parallel) -> list[str]:
        problems = super().validate(parallel) + self.vision().validate(parallel)
        if 2 * sum(self.mrope_section) != self.kv_channels:
            problems.append(f"model.mrope_section={list(self.mrope_section)} sums to {sum(self.mrope_section)}; "
                            f"M-RoPE needs head_dim / 2 = {self.kv_channels // 2}")
        return problems

    # ---- HuggingFace mapping -------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict):
        architecture = cls.HF_ARCHITECTURES[0]
        text = hf.get("text_config") or hf  # transformers 5 nests it; older configs are flat
        problems: list[str] = []
        hf_rules.check_equal(text, problems, "hidden_act", "silu", "silu")
        hf_rules.check_equal(text, problems, "use_sliding_window", False, False)
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or hf.get("rope_scaling") or {})
        section = rope.pop("mrope_section", None)
        if section is None:
            problems.append("no rope mrope_section")
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
            problems.append(f"rope scaling {rope.get('rope_type')!r}")
        theta = rope.get("rope_theta", text.get("rope_theta", hf.get("rope_theta", 1000000.0)))
        fields = hf_rules.decoder_fields_from_hf(text)
        fields["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
        vision = vision_config_from_hf(hf["vision_config"], cls.VISION_VARIANT, fields["hidden_size"], problems)
        hf_rules.unsupported(architecture, problems)
        return cls(
            **fields,
            rotary_base=float(theta),
            mrope_section=list(section),
            image_token_id=hf["image_token_id"],
            video_token_id=hf.get("video_token_id", -1),
            vision_depth=vision.depth,
            vision_hidden_size=vision.hidden_size,
            vision_num_heads=vision.num_heads,
            vision_ffn_hidden_size=vision.ffn_hidden_size,
            vision_patch_size=vision.patch_size,
            vision_temporal_patch_size=vision.temporal_patch_size,
            vision_spatial_merge_size=vision.spatial_merge_size,
            vision_rotary_base=vision.rotary_base,
            vision_window_size=vision.window_size,
            vision_fullatt_block_indexes=list(vision.fullatt_block_indexes),
        )

    def to_hf_config(self) -> dict:
        text = hf_rules.decoder_fields_to_hf(self, self.HF_ARCHITECTURES[0], f"{self.HF_MODEL_TYPE}_text")
        del text["architectures"], text["tie_word_embeddings"]  # the latter lives at the top level
        text.update(hidden_act="silu", rope_parameters={
            **hf_rules.rope_parameters(self.rotary_base), "mrope_section": list(self.mrope_section)})
        return {
            "architectures": list(self.HF_ARCHITECTURES),
            "model_type": self.HF_MODEL_TYPE,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": text,
            "vision_config": vision_config_to_hf(self.vision()),
        }

    def hf_rules(self) -> list:
        """Saved checkpoints name the language model `model.*` / `lm_head` and the vision tower `visual.*`."""
        language = hf_rules.prefixed(hf_rules.dense_decoder_rules(self, qk_norm=False, qkv_bias=True), "language_model.")
        return language + visual_hf_rules(self.vision(), ours="encoders.image", hf="visual")


CONFIG_CLASS = Qwen2VLConfig
