"""Llama 3 / 3.1 / 3.2 / 3.3: RMSNorm, SwiGLU, grouped-query attention, RoPE with Llama 3 scaling."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megatron_mm.checkpoint import hf_rules
from megatron_mm.models.layers.decoder import DecoderConfig

# megatron-core's Llama 3 scaling has these fixed; a config with others cannot be represented.
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


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

    # ---- HuggingFace mapping ------------------------------------------------------------------
    HF_ARCHITECTURES = ("LlamaForCausalLM",)

    @classmethod
    def from_hf_config(cls, hf: dict) -> "LlamaConfig":
        problems: list[str] = []
        hf_rules.check_dense_decoder(hf, problems)
        theta, scaling = hf_rules.rope_settings(hf)
        factor = None
        if scaling is not None:
            if scaling.get("rope_type") != "llama3":
                problems.append(f"rope scaling {scaling.get('rope_type')!r} (only llama3 is supported)")
            for key, value in LLAMA3_ROPE_FIXED.items():
                if scaling.get(key) != value:
                    problems.append(f"rope {key}={scaling.get(key)!r} (megatron-core fixes it at {value})")
            factor = scaling.get("factor")
        hf_rules.unsupported("LlamaForCausalLM", problems)
        return cls(**hf_rules.decoder_fields_from_hf(hf), rotary_base=theta, rope_scaling_factor=factor)

    def to_hf_config(self) -> dict:
        scaling = None
        if self.rope_scaling_factor is not None:
            scaling = {"rope_type": "llama3", "factor": self.rope_scaling_factor, **LLAMA3_ROPE_FIXED}
        return {**hf_rules.decoder_fields_to_hf(self, "LlamaForCausalLM", "llama"),
                "rope_parameters": hf_rules.rope_parameters(self.rotary_base, scaling)}

    def hf_rules(self) -> list:
        return hf_rules.dense_decoder_rules(self, qk_norm=False)


def llama_or_qwen2_fields(text: dict, problems: list[str], default_type: str) -> dict:
    """LlamaConfig fields plus `qkv_bias` from a multimodal model's HF text_config holding a Llama or
    a Qwen2 decoder (Qwen2: the Llama layout with q/k/v biases and plain RoPE); problems collects
    what cannot be represented."""
    language = text.get("model_type", default_type)
    if language == "llama":  # LlamaConfig raises, naming what it cannot represent
        llama = LlamaConfig.from_hf_config(text)
        fields = {f.name: getattr(llama, f.name) for f in dataclasses.fields(LlamaConfig) if f.name != "family"}
        return {**fields, "qkv_bias": False}
    if language == "qwen2":
        hf_rules.check_equal(text, problems, "hidden_act", "silu", "silu")
        hf_rules.check_equal(text, problems, "use_sliding_window", False, False)
        return dict(hf_rules.decoder_fields_from_hf(text), rotary_base=hf_rules.plain_rope(text, problems),
                    qkv_bias=True)
    problems.append(f"text model_type={language!r} (only llama and qwen2)")
    return {}


def llama_or_qwen2_text_config(cfg) -> dict:
    """The HF text_config of a multimodal model's decoder, the inverse of llama_or_qwen2_fields:
    Qwen2 when it has q/k/v biases, else Llama (tie_word_embeddings lives at the top level)."""
    if cfg.qkv_bias:
        text = hf_rules.decoder_fields_to_hf(cfg, "Qwen2ForCausalLM", "qwen2")
        text.update(hidden_act="silu", use_sliding_window=False, rope_parameters=hf_rules.rope_parameters(cfg.rotary_base))
    else:
        text = LlamaConfig.to_hf_config(cfg)
    del text["architectures"], text["tie_word_embeddings"]
    return text


CONFIG_CLASS = LlamaConfig
