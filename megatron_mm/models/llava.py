"""LLaVA-style vision-language models: a fixed-resolution CLIP or SigLIP ViT (models/vision.py) -> an
MLP (or affine, or learned-query resampler) projector -> a Llama 3 or Qwen2 decoder, as a
MultimodalModel (models/multimodal.py).

The config is the language model's (every llama3 field, flat, so layouts validate as for llama3)
plus `vision_*` fields for the encoder and projector. A sample's text holds `num_image_embeddings`
copies of `image_token_id` per image (the class token is dropped); the projected patch embeddings
replace them in order. The encoder and projector live on the first pipeline stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_mm.checkpoint import hf_rules
from megatron_mm.models.llama import LlamaConfig, llama_or_qwen2_fields, llama_or_qwen2_text_config
from megatron_mm.models.multimodal import MultimodalFamily
from megatron_mm.models.encoders.clip_siglip import ImageTower, VisionEncoderConfig


@dataclass
class LlavaConfig(MultimodalFamily, LlamaConfig):
    family: str = "llava"
    image_token_id: int = -1  # a vocabulary id reserved for image placeholders (required)
    vision_image_size: int = 32
    vision_patch_size: int = 8
    vision_hidden_size: int = 64
    vision_num_layers: int = 2
    vision_num_attention_heads: int = 4
    vision_ffn_hidden_size: int = 256
    vision_norm_epsilon: float = 1e-5
    projector_ffn_hidden_size: int = 128
    projector_type: str = "mlp"  # mlp | affine | resampler
    resampler_num_queries: int = 16  # image embeddings per image with the resampler
    resampler_num_layers: int = 1
    resampler_num_attention_heads: int = 4
    resampler_ffn_hidden_size: int = 256
    vision_encoder_type: str = "clip"  # clip | siglip
    vision_activation: str = ""  # empty: the encoder type's own
    qkv_bias: bool = False  # a Qwen2 language model's q/k/v biases
    # HuggingFace towers imported: their layer count, SigLIP pooling head and tensor prefix, for export
    hf_vision_tower_layers: int = 0  # 0: the layers we run
    hf_vision_pooling_head: bool = False
    hf_vision_prefix: str = "vision_tower"

    def vision(self) -> VisionEncoderConfig:
        return VisionEncoderConfig(
            image_size=self.vision_image_size,
            patch_size=self.vision_patch_size,
            hidden_size=self.vision_hidden_size,
            num_layers=self.vision_num_layers,
            num_attention_heads=self.vision_num_attention_heads,
            ffn_hidden_size=self.vision_ffn_hidden_size,
            norm_epsilon=self.vision_norm_epsilon,
            projector_ffn_hidden_size=self.projector_ffn_hidden_size,
            projector_type=self.projector_type,
            resampler_num_queries=self.resampler_num_queries,
            resampler_num_layers=self.resampler_num_layers,
            resampler_num_attention_heads=self.resampler_num_attention_heads,
            resampler_ffn_hidden_size=self.resampler_ffn_hidden_size,
            encoder_type=self.vision_encoder_type,
            activation=self.vision_activation,
            post_layernorm=False,  # LLaVA reads the encoder's hidden states, before any final norm
        )

    def family_transformer_fields(self) -> dict:
        return {**super().family_transformer_fields(), "add_qkv_bias": self.qkv_bias}

    @property
    def num_image_embeddings(self) -> int:
        return self.vision().num_image_embeddings

    # ---- MultimodalFamily ----------------------------------------------------------------------
    def placeholder_ids(self) -> dict[str, int]:
        return {"image": self.image_token_id}

    def media_processors(self) -> dict:
        from megatron_mm.data.image_processing import FixedSizeImageProcessor

        return {"image": FixedSizeImageProcessor(self.vision_image_size, self.vision_encoder_type,
                                                 self.num_image_embeddings)}

    def build_encoders(self, transformer_config, backend) -> dict[str, torch.nn.Module]:
        return {"image": ImageTower(self.vision(), transformer_config, backend)}

    def encoder_counts(self) -> dict:
        return {"image": self.vision().counts(self.hidden_size)}

    def validate(self, parallel) -> list[str]:
        problems = super().validate(parallel) + self.vision().validate(parallel)
        if self.num_image_embeddings >= self.max_position_embeddings:
            problems.append(f"model.max_position_embeddings={self.max_position_embeddings} leaves no room for "
                            f"text after {self.num_image_embeddings} image embeddings")
        return problems

    # ---- HuggingFace mapping: LlavaForConditionalGeneration -------------------------------------
    # A CLIP or SigLIP tower run up to the hidden state LLaVA reads (vision_feature_layer), the
    # two-layer GELU projector (multi_modal_projector.linear_1/2), a Llama or Qwen2 decoder. The tower
    # layers after that state, its final norm and SigLIP's pooling head are never read: import drops
    # them, export writes them back as zeros.
    HF_ARCHITECTURES = ("LlavaForConditionalGeneration",)

    @classmethod
    def from_hf_config(cls, hf: dict):
        from megatron_mm.models.encoders.clip_siglip import vision_config_from_hf

        text, hf_vision = hf.get("text_config") or {}, hf.get("vision_config") or {}
        problems: list[str] = []
        fields = llama_or_qwen2_fields(text, problems, default_type="llama")
        fields["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
        hf_rules.check_equal(hf, problems, "projector_hidden_act", "gelu", "gelu")
        hf_rules.check_equal(hf, problems, "multimodal_projector_bias", True, True)
        encoder_type = "siglip" if hf_vision.get("model_type") == "siglip_vision_model" else "clip"
        # LLaVA's "default" drops the first token: CLIP's class token, but a SigLIP patch
        strategy = {"clip": "default", "siglip": "full"}[encoder_type]
        hf_rules.check_equal(hf, problems, "vision_feature_select_strategy", strategy, "default")
        tower_layers, feature_layer = hf_vision.get("num_hidden_layers", 0), hf.get("vision_feature_layer", -2)
        layers = tower_layers
        if not isinstance(feature_layer, int):
            problems.append(f"vision_feature_layer={feature_layer!r} (one layer only)")
        else:
            try:
                layers = VisionEncoderConfig.layers_up_to(feature_layer, tower_layers)
            except ValueError as err:
                problems.append(str(err))
        vision = vision_config_from_hf(hf_vision, layers, problems)
        hf_rules.unsupported("LlavaForConditionalGeneration", problems)
        # transformers 5 saves a tower's tensors without the `vision_model.` level that earlier versions wrote
        old_names = int(str(hf.get("transformers_version", "5")).split(".")[0]) < 5
        return cls(
            **fields,
            image_token_id=hf.get("image_token_id", hf.get("image_token_index", -1)),
            vision_image_size=vision.image_size,
            vision_patch_size=vision.patch_size,
            vision_hidden_size=vision.hidden_size,
            vision_num_layers=vision.num_layers,
            vision_num_attention_heads=vision.num_attention_heads,
            vision_ffn_hidden_size=vision.ffn_hidden_size,
            vision_norm_epsilon=vision.norm_epsilon,
            vision_encoder_type=vision.encoder_type,
            vision_activation=vision.activation,
            projector_ffn_hidden_size=fields.get("hidden_size", 0),
            projector_type="mlp",
            hf_vision_tower_layers=tower_layers,
            hf_vision_pooling_head=encoder_type == "siglip" and bool(hf_vision.get("vision_use_head", True)),
            hf_vision_prefix="vision_tower.vision_model" if old_names else "vision_tower",
        )

    def to_hf_config(self) -> dict:
        from megatron_mm.models.encoders.clip_siglip import vision_config_to_hf

        vision = self.vision()
        tower_layers = self.hf_vision_tower_layers or vision.num_layers
        text = llama_or_qwen2_text_config(self)
        hf_vision = vision_config_to_hf(vision, tower_layers)
        if vision.encoder_type == "siglip":
            hf_vision["vision_use_head"] = self.hf_vision_pooling_head
        return {
            "architectures": list(self.HF_ARCHITECTURES),
            "model_type": "llava",
            "image_token_index": self.image_token_id,
            "image_seq_length": self.num_image_embeddings,
            "projector_hidden_act": "gelu",
            "multimodal_projector_bias": True,
            "vision_feature_layer": vision.num_layers - tower_layers - 1,
            "vision_feature_select_strategy": "default" if vision.encoder_type == "clip" else "full",
            "tie_word_embeddings": self.tie_word_embeddings,
            "text_config": text,
            "vision_config": hf_vision,
        }

    def hf_rules(self) -> list:
        """Saved checkpoints name the decoder `language_model.model.*` / `language_model.lm_head`,
        the tower `vision_tower[.vision_model].*` and the projector `multi_modal_projector.*`."""
        from megatron_mm.checkpoint.hf_rules import same
        from megatron_mm.models.encoders.clip_siglip import carrying_unread, unread_tower_tensors, vision_tower_hf_rules

        language = hf_rules.prefixed(hf_rules.dense_decoder_rules(self, qk_norm=False, qkv_bias=self.qkv_bias),
                                     "language_model.", "language_model.")
        vision = self.vision()
        tower = vision_tower_hf_rules(vision, ours="encoders.image.encoder", hf=self.hf_vision_prefix)
        unread = unread_tower_tensors(vision, self.hf_vision_prefix, self.hf_vision_tower_layers or vision.num_layers,
                                      self.hf_vision_pooling_head)
        if unread:
            tower[0] = carrying_unread(tower[0], unread)
        projector = [same(f"encoders.image.projector.encoder.linear_fc{i}.{t}", f"multi_modal_projector.linear_{i}.{t}")
                     for i in (1, 2) for t in ("weight", "bias")]
        return language + tower + projector


CONFIG_CLASS = LlavaConfig
