"""Qwen2-Audio-style audio-language models: the Whisper-style encoder of models/audio.py (average
pooling by 2, a linear projector) in front of a Qwen2 decoder (the Llama layout with q/k/v biases;
`qkv_bias: false` gives a Llama decoder), as a MultimodalModel (models/multimodal.py).

The config is the language model's (every llama3 field, flat) plus `audio_*` fields. Every clip is
cut to one chunk (30 s for Whisper's 1500 positions), and a sample's text holds
`num_audio_embeddings` copies of `audio_token_id` per clip; the projected encoder states replace them
in order. The encoder and projector live on the first pipeline stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_mm.checkpoint import hf_rules
from megatron_mm.models.encoders.audio import (
    AudioEncoder,
    AudioEncoderConfig,
    audio_config_from_hf,
    audio_config_to_hf,
    audio_encoder_hf_rules,
    audio_projector_hf_rules,
)
from megatron_mm.models.llama import LlamaConfig, llama_or_qwen2_fields, llama_or_qwen2_text_config
from megatron_mm.models.multimodal import MultimodalFamily


@dataclass
class Qwen2AudioConfig(MultimodalFamily, LlamaConfig):
    family: str = "qwen2_audio"
    rotary_base: float = 10000.0
    qkv_bias: bool = True  # Qwen2's q/k/v biases; false: a Llama decoder
    audio_token_id: int = -1  # a vocabulary id reserved for audio placeholders (required)
    audio_num_mel_bins: int = 128
    audio_hidden_size: int = 64
    audio_num_layers: int = 2
    audio_num_attention_heads: int = 4
    audio_ffn_hidden_size: int = 256
    audio_max_source_positions: int = 1500
    audio_chunk_seconds: float = 0.0  # 0: the longest the positions allow (30 s for 1500)
    audio_pooling_stride: int = 2
    audio_projector_type: str = "affine"  # affine (Qwen2-Audio) | mlp
    audio_projector_ffn_hidden_size: int = 256

    def audio(self) -> AudioEncoderConfig:
        return AudioEncoderConfig(
            num_mel_bins=self.audio_num_mel_bins,
            hidden_size=self.audio_hidden_size,
            num_layers=self.audio_num_layers,
            num_attention_heads=self.audio_num_attention_heads,
            ffn_hidden_size=self.audio_ffn_hidden_size,
            max_source_positions=self.audio_max_source_positions,
            pooling_stride=self.audio_pooling_stride,
            projector_type=self.audio_projector_type,
            projector_ffn_hidden_size=self.audio_projector_ffn_hidden_size,
            chunk_seconds=self.audio_chunk_seconds,
        )

    @property
    def num_audio_embeddings(self) -> int:
        """Placeholder tokens per clip."""
        return self.audio().embeddings_per_clip

    def family_transformer_fields(self) -> dict:
        return {**super().family_transformer_fields(), "add_qkv_bias": self.qkv_bias}

    # ---- MultimodalFamily ----------------------------------------------------------------------
    def placeholder_ids(self) -> dict[str, int]:
        return {"audio": self.audio_token_id}

    def media_processors(self) -> dict:
        return {"audio": self.audio().processor()}

    def build_encoders(self, transformer_config, backend) -> dict[str, torch.nn.Module]:
        return {"audio": AudioEncoder(self.audio(), transformer_config, backend)}

    def encoder_counts(self) -> dict:
        return {"audio": self.audio().counts(self.hidden_size)}

    def validate(self, parallel) -> list[str]:
        problems = super().validate(parallel) + self.audio().validate(parallel)
        if not problems and self.num_audio_embeddings >= self.max_position_embeddings:
            problems.append(f"model.max_position_embeddings={self.max_position_embeddings} leaves no room for "
                            f"text after {self.num_audio_embeddings} audio embeddings")
        return problems

    # ---- HuggingFace mapping: Qwen2AudioForConditionalGeneration -------------------------------
    # Saved checkpoints name the encoder `audio_tower.*`, the projector `multi_modal_projector.linear`
    # and the decoder `language_model.model.*` / `language_model.lm_head`.
    HF_ARCHITECTURES = ("Qwen2AudioForConditionalGeneration",)

    @classmethod
    def from_hf_config(cls, hf: dict):
        text, hf_audio = hf.get("text_config") or {}, hf.get("audio_config") or {}
        problems: list[str] = []
        fields = llama_or_qwen2_fields(text, problems, default_type="qwen2")
        # transformers' Qwen2AudioForConditionalGeneration never ties lm_head to the embedding,
        # whatever the config says: it always reads its own lm_head.
        fields["tie_word_embeddings"] = False
        audio = audio_config_from_hf(hf_audio, problems)
        hf_rules.unsupported("Qwen2AudioForConditionalGeneration", problems)
        return cls(
            **fields,
            audio_token_id=hf.get("audio_token_id", hf.get("audio_token_index", -1)),
            audio_num_mel_bins=audio.num_mel_bins,
            audio_hidden_size=audio.hidden_size,
            audio_num_layers=audio.num_layers,
            audio_num_attention_heads=audio.num_attention_heads,
            audio_ffn_hidden_size=audio.ffn_hidden_size,
            audio_max_source_positions=audio.max_source_positions,
        )

    def to_hf_config(self) -> dict:
        if self.audio_pooling_stride != 2 or self.audio_projector_type != "affine":
            raise ValueError("Qwen2-Audio pools by 2 and projects with one linear; this model has "
                             f"audio_pooling_stride={self.audio_pooling_stride}, "
                             f"audio_projector_type={self.audio_projector_type!r}")
        text = llama_or_qwen2_text_config(self)
        return {
            "architectures": list(self.HF_ARCHITECTURES),
            "model_type": "qwen2_audio",
            "audio_token_index": self.audio_token_id,
            "tie_word_embeddings": False,
            "text_config": text,
            "audio_config": audio_config_to_hf(self.audio()),
        }

    def hf_rules(self) -> list:
        """A tied model writes its embedding twice, as transformers reads an lm_head of its own."""
        language = hf_rules.dense_decoder_rules(self, qk_norm=False, qkv_bias=self.qkv_bias)
        if self.tie_word_embeddings:
            language[0] = hf_rules.duplicated(language[0].ours, (*language[0].hf, "lm_head.weight"))
        language = hf_rules.prefixed(language, "language_model.", "language_model.")
        audio = self.audio()
        return (language + audio_encoder_hf_rules(audio, ours="encoders.audio", hf="audio_tower")
                + audio_projector_hf_rules(audio, ours="encoders.audio.projector", hf="multi_modal_projector"))


CONFIG_CLASS = Qwen2AudioConfig
