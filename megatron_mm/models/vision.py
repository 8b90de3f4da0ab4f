"""The vision side of a LLaVA-style model: a CLIP ViT encoder and the MLP projector into the
language model's hidden size, both megatron-core modules (CLIPViTModel, MultimodalProjector).

megatron-core 0.16.1's own pieces are used as they are, with two CPU-side corrections:
- its local ViT layer spec uses a causal mask; a ViT attends both ways (the TE spec says no_mask),
  so the local spec here uses no_mask too and both backends compute the same encoder;
- without Transformer Engine, CLIPViTModel's default ln_pre is torch.nn.LayerNorm, which
  build_module cannot construct (it passes config=); VisionEncoder swaps in megatron-core's
  WrappedTorchNorm (a LayerNorm taking the config).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class VisionEncoderConfig:
    image_size: int = 32  # square images, pixels
    patch_size: int = 8
    hidden_size: int = 64  # ViT width
    num_layers: int = 2
    num_attention_heads: int = 4
    ffn_hidden_size: int = 256
    norm_epsilon: float = 1e-5
    projector_ffn_hidden_size: int = 128  # hidden width of the 2-layer MLP projector
    projector_type: str = "mlp"  # mlp (LLaVA-1.5) | affine

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_embeddings(self) -> int:
        """Embeddings one image contributes to the language sequence (class token dropped)."""
        return self.num_patches

    def validate(self, parallel) -> list[str]:
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"vision image_size={self.image_size} is not divisible by patch_size={self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"vision hidden_size={self.hidden_size} is not divisible by its "
                            f"num_attention_heads={self.num_attention_heads}")
        for name, value in (("num_attention_heads", self.num_attention_heads),
                            ("ffn_hidden_size", self.ffn_hidden_size),
                            ("projector_ffn_hidden_size", self.projector_ffn_hidden_size)):
            if value % parallel.tp:
                problems.append(f"vision {name}={value} is not divisible by parallel.tp={parallel.tp}")
        if self.projector_type not in ("mlp", "affine"):
            problems.append(f"vision projector_type={self.projector_type!r} is not one of mlp, affine")
        return problems

    # ---- megatron-core configs and specs ---------------------------------------------------------
    def encoder_transformer_config(self, language_config):
        """The ViT's TransformerConfig: the language config's precision and TP, its own shape, no PP
        (the whole encoder lives on the first pipeline stage)."""
        from megatron.core.activations import quick_gelu

        config = dataclasses.replace(
            language_config,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_attention_heads,
            kv_channels=self.hidden_size // self.num_attention_heads,
            layernorm_epsilon=self.norm_epsilon,
            normalization="LayerNorm",
            gated_linear_unit=False,
            activation_func=quick_gelu,
            add_bias_linear=True,
            add_qkv_bias=True,
            qk_layernorm=False,
            bias_activation_fusion=False,
            apply_rope_fusion=False,
            pipeline_model_parallel_size=1,
            virtual_pipeline_model_parallel_size=None,
            sequence_parallel=False,
            context_parallel_size=1,
        )
        config.vision_model_type = "clip"  # read by LLaVAModel
        return config

    def projector_transformer_config(self, language_config):
        """The projector maps ViT width -> ffn -> the language model's hidden size."""
        return dataclasses.replace(
            language_config,
            ffn_hidden_size=self.projector_ffn_hidden_size,
            gated_linear_unit=False,
            activation_func=torch.nn.functional.gelu,
            add_bias_linear=True,
            bias_activation_fusion=False,
            pipeline_model_parallel_size=1,
            virtual_pipeline_model_parallel_size=None,
            sequence_parallel=False,
            context_parallel_size=1,
        )

    @staticmethod
    def encoder_layer_spec(use_te: bool):
        from megatron.core.models.vision.vit_layer_specs import (
            get_vit_layer_with_local_spec,
            get_vit_layer_with_transformer_engine_spec,
        )
        from megatron.core.transformer.enums import AttnMaskType

        if use_te:
            return get_vit_layer_with_transformer_engine_spec()
        spec = get_vit_layer_with_local_spec()
        spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.no_mask}
        return spec

    @staticmethod
    def projector_spec(use_te: bool):
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.mlp import MLPSubmodules

        if use_te:
            from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

            return MLPSubmodules(linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear)
        return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def vision_encoder_class():
    """CLIPViTModel whose torch.nn.LayerNorm default (no TE) is replaced by WrappedTorchNorm."""
    from megatron.core.models.vision.clip_vit_model import CLIPViTModel
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    class VisionEncoder(CLIPViTModel):
        def __init__(self, *args, ln_pre_impl=None, ln_post_impl=None, **kwargs):
            from megatron.core.models.vision import clip_vit_model

            default = clip_vit_model.NORM_IMPL
            if default is torch.nn.LayerNorm:
                default = WrappedTorchNorm
            super().__init__(*args, ln_pre_impl=ln_pre_impl or default, ln_post_impl=ln_post_impl or default,
                             **kwargs)

    return VisionEncoder
