"""LLaVA-style vision-language models: a fixed-resolution ViT (models/vision.py) -> MLP projector ->
a Llama 3 decoder, as a MultimodalModel (models/multimodal.py).

The config is the language model's (every llama3 field, flat, so layouts validate as for llama3)
plus `vision_*` fields for the encoder and projector. A sample's text holds `num_image_embeddings`
copies of `image_token_id` per image (the class token is dropped); the projected patch embeddings
replace them in order. The encoder and projector live on the first pipeline stage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_mm.models.llama import LlamaConfig
from megatron_mm.models.multimodal import MultimodalFamily
from megatron_mm.models.vision import VisionEncoderConfig, vision_encoder_class


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

    # ---- MultimodalFamily ----------------------------------------------------------------------
    def placeholder_ids(self) -> dict[str, int]:
        return {"image": self.image_token_id}

    def media_processors(self) -> dict:
        return {"image": FixedSizeImages(self.vision_image_size, self.num_image_embeddings)}

    def build_encoders(self, transformer_config, use_te: bool) -> dict[str, torch.nn.Module]:
        return {"image": ImageEncoder(self.vision(), transformer_config, use_te)}

    def encoder_num_parameters(self) -> int:
        v = self.vision()
        h, f = v.hidden_size, v.ffn_hidden_size
        encoder = v.num_layers * (4 * h * h + 2 * h * f + 9 * h + f) + 3 * v.patch_size ** 2 * h
        return encoder + h * v.projector_ffn_hidden_size + v.projector_ffn_hidden_size * self.hidden_size

    def validate(self, parallel) -> list[str]:
        from megatron_mm.runtime import transformer_engine_available

        problems = super().validate(parallel) + self.vision().validate(parallel)
        if parallel.cp > 1 and not transformer_engine_available():
            problems.append(f"model.family={self.family}: context parallel needs Transformer Engine")
        if self.num_image_embeddings >= self.max_position_embeddings:
            problems.append(f"model.max_position_embeddings={self.max_position_embeddings} leaves no room for "
                            f"text after {self.num_image_embeddings} image embeddings")
        return problems

    # ---- HuggingFace mapping: none yet ---------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict):
        from megatron_mm.checkpoint.hf_rules import HFConversionError

        raise HFConversionError("model.family=llava has no HuggingFace mapping yet")

    def to_hf_config(self) -> dict:
        return self.from_hf_config({})

    def hf_rules(self) -> list:
        return self.from_hf_config({})


class ImageEncoder(MegatronModule):
    """ViT -> projector: images [n, 3, H, W] -> [n * patches, language hidden] (class token dropped)."""

    MEDIA_KEYS = ("images",)

    def __init__(self, vision: VisionEncoderConfig, language_config, use_te: bool):
        from megatron.core.models.vision.multimodal_projector import MultimodalProjector

        encoder_config = vision.encoder_transformer_config(language_config)
        super().__init__(config=encoder_config)
        self.encoder = vision_encoder_class()(
            encoder_config, vision.encoder_layer_spec(use_te),
            patch_dim=vision.patch_size, img_h=vision.image_size, img_w=vision.image_size,
        )
        self.projector = MultimodalProjector(
            vision.projector_transformer_config(language_config), vision.projector_spec(use_te),
            vision.projector_type, vision.hidden_size,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.encoder(images)[:, self.encoder.class_token_len if self.encoder.add_class_token else 0:]
        return self.projector(patches.reshape(-1, patches.shape[-1]))


class FixedSizeImages:
    """uint8 HxWx3 -> {"images": [1, 3, size, size]} in [-1, 1] and the placeholder count."""

    modality = "image"

    def __init__(self, image_size: int, num_placeholders: int):
        self.image_size, self.num_placeholders = image_size, num_placeholders

    def __call__(self, item) -> tuple[dict, int]:
        import numpy
        from PIL import Image

        image = numpy.asarray(item)
        if image.shape[:2] != (self.image_size, self.image_size):
            image = numpy.asarray(Image.fromarray(image).resize((self.image_size, self.image_size), Image.BICUBIC))
        pixels = torch.tensor(image).permute(2, 0, 1).float() / 127.5 - 1.0
        return {"images": pixels.unsqueeze(0)}, self.num_placeholders


CONFIG_CLASS = LlavaConfig
