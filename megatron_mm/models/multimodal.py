"""LLaVA-style vision-language model: CLIP ViT -> MLP projector -> a Llama 3 decoder, built as
megatron-core's LLaVAModel.

The config is the language model's (every llama3 field, flat, so layouts validate as for llama3)
plus `vision_*` fields for the encoder and projector (models/vision.py). Each image placeholder
token (`image_token_id`, one per sample) in the text is replaced by the image's projected patch
embeddings, so the decoder sees `len(text) - 1 + num_image_embeddings` positions; with pipeline
parallelism the encoder and projector live on the first stage and every sequence is padded to
`max_position_embeddings` (LLaVAModel's rule), which therefore must equal data.seq_length.

Layouts: TP and PP as megatron-core allows; not sequence or context parallel without Transformer
Engine (LLaVAModel asserts TEDotProductAttention for both), and no virtual pipeline stages yet.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from megatron_mm.models.llama import LlamaConfig
from megatron_mm.models.vision import VisionEncoderConfig, vision_encoder_class

DEFAULT_IMAGE_TOKEN_ID = -200  # megatron-core's DEFAULT_IMAGE_TOKEN_INDEX; never looked up as a word


@dataclass
class LlavaConfig(LlamaConfig):
    family: str = "llava"
    image_token_id: int = DEFAULT_IMAGE_TOKEN_ID
    vision_image_size: int = 32
    vision_patch_size: int = 8
    vision_hidden_size: int = 64
    vision_num_layers: int = 2
    vision_num_attention_heads: int = 4
    vision_ffn_hidden_size: int = 256
    vision_norm_epsilon: float = 1e-5
    projector_ffn_hidden_size: int = 128
    projector_type: str = "mlp"

    HF_ARCHITECTURES = ()  # no HuggingFace mapping yet (LlamaConfig's must not be inherited)

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
        )

    @property
    def num_image_embeddings(self) -> int:
        return self.vision().num_image_embeddings

    def validate(self, parallel) -> list[str]:
        from megatron_mm.runtime import transformer_engine_available

        problems = super().validate(parallel) + self.vision().validate(parallel)
        if parallel.vpp is not None:
            problems.append("model.family=llava does not support parallel.vpp yet")
        if (parallel.sequence_parallel or parallel.cp > 1) and not transformer_engine_available():
            problems.append("model.family=llava: sequence/context parallel need Transformer Engine "
                            "(megatron-core's LLaVAModel asserts TEDotProductAttention)")
        if self.num_image_embeddings >= self.max_position_embeddings:
            problems.append(f"model.max_position_embeddings={self.max_position_embeddings} leaves no room for "
                            f"text after {self.num_image_embeddings} image embeddings")
        return problems

    def build(self, transformer_config, use_te: bool, pre_process: bool, post_process: bool, vp_stage=None):
        from megatron.core.models.multimodal import llava_model
        from megatron.core.transformer.enums import ModelType

        vision = self.vision()
        rope = self.family_model_kwargs()
        with _vision_encoder_patched(llava_model):
            model = llava_model.LLaVAModel(
                language_transformer_config=transformer_config,
                language_transformer_layer_spec=self.layer_spec(transformer_config, use_te, vp_stage),
                language_vocab_size=self.padded_vocab_size(),
                language_max_sequence_length=self.max_position_embeddings,
                vision_transformer_config=vision.encoder_transformer_config(transformer_config),
                vision_transformer_layer_spec=vision.encoder_layer_spec(use_te),
                drop_vision_class_token=True,
                vision_projection_config=vision.projector_transformer_config(transformer_config),
                vision_projection_layer_spec=vision.projector_spec(use_te),
                vision_projection_type=vision.projector_type,
                share_embeddings_and_output_weights=self.tie_word_embeddings,
                language_position_embedding_type="rope",
                language_rotary_base=int(self.rotary_base),
                language_rope_scaling=rope.get("rope_scaling", False),
                language_rope_scaling_factor=rope.get("rope_scaling_factor", 8.0),
                pre_process=pre_process,
                post_process=post_process,
                add_encoder=pre_process,  # the encoder runs on the first pipeline stage
                add_decoder=True,
                img_h=vision.image_size,
                img_w=vision.image_size,
                patch_dim=vision.patch_size,
                image_token_index=self.image_token_id,
                vp_stage=vp_stage,
            )
        # What Megatron-LM's get_model sets and the schedules read: the encoder shares the first
        # stage, so the pipeline sees one decoder-like model.
        model.model_type = ModelType.encoder_or_decoder
        return model

    def num_parameters(self) -> tuple[int, int]:
        """Language model counts plus the encoder and projector (FLOP estimate; images not counted)."""
        total, embedding = super().num_parameters()
        v = self.vision()
        h, f = v.hidden_size, v.ffn_hidden_size
        encoder = v.num_layers * (4 * h * h + 2 * h * f + 9 * h + f) + 3 * v.patch_size ** 2 * h
        projector = h * v.projector_ffn_hidden_size + v.projector_ffn_hidden_size * self.hidden_size
        return total + encoder + projector, embedding

    # ---- HuggingFace mapping: none yet ---------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict):
        from megatron_mm.checkpoint.hf_rules import HFConversionError

        raise HFConversionError("model.family=llava has no HuggingFace mapping yet")

    def to_hf_config(self) -> dict:
        return self.from_hf_config({})

    def hf_rules(self) -> list:
        return self.from_hf_config({})


@contextlib.contextmanager
def _vision_encoder_patched(llava_model):
    """LLaVAModel builds `CLIPViTModel` from its module globals; build ours (models/vision.py)."""
    original = llava_model.CLIPViTModel
    llava_model.CLIPViTModel = vision_encoder_class()
    try:
        yield
    finally:
        llava_model.CLIPViTModel = original


CONFIG_CLASS = LlavaConfig
