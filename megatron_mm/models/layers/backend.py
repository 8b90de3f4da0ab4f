"""The one place layer backends plug in. Every spec builder (dense and MoE decoders, MLA, Gemma 3's
modules, the CLIP/SigLIP and Qwen2-VL towers, the audio encoder, the projectors) takes its modules
from one backend object (`LocalBackend` or a subclass), chosen once per run from `model.backend`:

    auto   Transformer Engine when it imports on a GPU, else local
    te     Transformer Engine's modules, as megatron-core's TE layer specs use them
    local  megatron-core's pure-torch modules (its local layer specs)

A new backend (another attention kernel, FP8 linears) is a subclass overriding the modules it
changes; the spec builders stay as they are. Decoder and ViT layer specs come from megatron-core's
own spec functions; a subclass of the local backend has its modules put in place of the local ones
there too (`adopt`).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.models.vision.vit_layer_specs import (
    get_vit_layer_with_local_spec,
    get_vit_layer_with_transformer_engine_spec,
)
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import (
    CrossAttention,
    CrossAttentionSubmodules,
    SelfAttention,
    SelfAttentionSubmodules,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_mm.errors import UserError

BACKEND_CHOICES = ("auto", "te", "local")


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE import failures are many-shaped (ImportError, OSError on missing libs)
        return False
    return True


class LocalBackend:
    """megatron-core's torch modules, as its LocalSpecProvider and local layer specs use them."""

    name = "local"
    uses_te = False  # selects megatron-core's TE or local spec functions
    # Attention over packed sequences (thd with cu_seqlens) instead of an explicit mask.
    packed_sequence_attention = False

    def column_linear(self) -> type:
        return ColumnParallelLinear

    def row_linear(self) -> type:
        return RowParallelLinear

    def norm(self) -> type:
        """A LayerNorm / RMSNorm module taking (config, hidden_size, eps), per config.normalization."""
        return WrappedTorchNorm

    def core_attention(self) -> type:
        return DotProductAttention

    def mla_core_attention(self) -> type:
        """Core attention of Multi-Latent Attention (keys and values of different head widths)."""
        return LocalMLACoreAttention

    def transformer_fields(self, moe: bool) -> dict:
        """TransformerConfig fields that depend on the backend: fused kernels come from TE/apex/CUDA;
        the torch paths run everywhere."""
        fused = self.uses_te
        fields = dict(masked_softmax_fusion=fused, bias_activation_fusion=fused, bias_dropout_fusion=fused,
                      apply_rope_fusion=fused, gradient_accumulation_fusion=fused, persist_layer_norm=False)
        if moe:  # TE's grouped GEMM runs all local experts in one kernel; without it, one after another
            fields["moe_grouped_gemm"] = self.uses_te
        return fields

    # ---- layer specs ------------------------------------------------------------------------------
    def adopt(self, spec):
        """A megatron-core local spec with this backend's modules in place of the local ones
        (in place; the spec is returned)."""
        replacements = {DotProductAttention: self.core_attention(), ColumnParallelLinear: self.column_linear(),
                        RowParallelLinear: self.row_linear()}
        _replace_modules(spec, {old: new for old, new in replacements.items() if old is not new})
        return spec

    def gpt_layer_spec(self, qk_layernorm: bool, normalization: str):
        """A dense decoder layer (megatron-core's GPT layer spec of this backend)."""
        return self.adopt(get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization))

    def decoder_block_spec(self, config, normalization: str, vp_stage=None):
        """This pipeline stage's decoder layers, each dense or MoE as config.moe_layer_freq says."""
        return self.adopt(get_gpt_decoder_block_spec(config, use_transformer_engine=self.uses_te,
                                                     normalization=normalization, vp_stage=vp_stage))

    def mtp_block_spec(self, config, layer_spec, vp_stage=None):
        """The multi-token-prediction block after the decoder (built on the last stage)."""
        return self.adopt(get_gpt_mtp_block_spec(config, layer_spec, self.uses_te, vp_stage=vp_stage))

    def vit_layer_spec(self):
        """A CLIP/SigLIP ViT layer attending both ways. megatron-core's local ViT spec says causal
        (its TE spec no_mask); a ViT attends both ways, so both backends compute the same encoder."""
        spec = get_vit_layer_with_local_spec()
        spec.submodules.self_attention.params = {"attn_mask_type": AttnMaskType.no_mask}
        return self.adopt(spec)

    def encoder_layer_spec(self, attn_mask_type):
        """A pre-norm encoder layer (self-attention, MLP) with separate norm modules on every backend,
        so checkpoints keep the same names (input_layernorm / pre_mlp_layernorm with their biases)."""
        return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=self.norm(),
            self_attention=ModuleSpec(
                module=SelfAttention, params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(linear_qkv=self.column_linear(),
                                                   core_attention=self.core_attention(),
                                                   linear_proj=self.row_linear())),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=self.norm(),
            mlp=ModuleSpec(module=MLP, submodules=self.mlp_submodules()),
            mlp_bda=get_bias_dropout_add,
        ))

    def cross_attention_layer_spec(self):
        """A layer without self-attention: norm -> cross-attention to a context -> residual, norm ->
        MLP -> residual (the resampler's)."""
        column = self.column_linear()
        return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            pre_cross_attn_layernorm=self.norm(),
            cross_attention=ModuleSpec(
                module=CrossAttention, params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=CrossAttentionSubmodules(linear_q=column, linear_kv=column,
                                                    core_attention=self.core_attention(),
                                                    linear_proj=self.row_linear())),
            cross_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=self.norm(),
            mlp=ModuleSpec(module=MLP, submodules=self.mlp_submodules()),
            mlp_bda=get_bias_dropout_add,
        ))

    def mlp_submodules(self):
        """A two-linear MLP (encoder layers, projectors)."""
        return MLPSubmodules(linear_fc1=self.column_linear(), linear_fc2=self.row_linear())


class TransformerEngineBackend(LocalBackend):
    """Transformer Engine's modules, as megatron-core's TE layer specs (TESpecProvider) use them."""

    name = "te"
    uses_te = True
    packed_sequence_attention = True

    def column_linear(self) -> type:
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear

        return TEColumnParallelLinear

    def row_linear(self) -> type:
        from megatron.core.extensions.transformer_engine import TERowParallelLinear

        return TERowParallelLinear

    def norm(self) -> type:
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm

    def core_attention(self) -> type:
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention

    def mla_core_attention(self) -> type:
        return self.core_attention()  # TE's attention takes MLA's k/v channel widths

    def adopt(self, spec):
        return spec  # megatron-core's TE specs already hold TE's modules

    def gpt_layer_spec(self, qk_layernorm: bool, normalization: str):
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)

    def vit_layer_spec(self):
        return get_vit_layer_with_transformer_engine_spec()


BACKENDS = {"local": LocalBackend, "te": TransformerEngineBackend}


def select_backend(name: str = "auto") -> LocalBackend:
    """The backend `model.backend` names; a TE request without Transformer Engine is refused."""
    if name not in BACKEND_CHOICES:
        raise UserError(f"model.backend={name!r} is not one of {', '.join(BACKEND_CHOICES)}")
    if name == "auto":
        name = "te" if transformer_engine_available() else "local"
    elif name == "te" and not transformer_engine_available():
        raise UserError("model.backend=te needs Transformer Engine on a GPU (transformer_engine.pytorch "
                        "does not import here); use model.backend=local or auto")
    return BACKENDS[name]()


# megatron-core 0.16.1's MLASelfAttention accepts only its own classes for the latent
# down-projections (it tests the class to choose their arguments): they stay as its spec says.
KEEP_SUBMODULES = ("linear_q_down_proj", "linear_kv_down_proj")


def _replace_modules(node, replacements: dict) -> None:
    """Replace module classes (exact classes, not subclasses) throughout a spec tree: ModuleSpecs,
    submodule dataclasses and lists of layer specs."""
    if not replacements or node is None:
        return
    if isinstance(node, ModuleSpec):
        node.module = replacements.get(node.module, node.module)
        _replace_modules(node.submodules, replacements)
    elif isinstance(node, (list, tuple)):
        for item in node:
            _replace_modules(item, replacements)
    elif dataclasses.is_dataclass(node) and not isinstance(node, type):
        for field in dataclasses.fields(node):
            if field.name in KEEP_SUBMODULES:
                continue
            value = getattr(node, field.name)
            if isinstance(value, type) and value in replacements:
                setattr(node, field.name, replacements[value])
            else:
                _replace_modules(value, replacements)


class LocalMLACoreAttention(DotProductAttention):
    """megatron-core's torch attention for MLA: 0.16.1's MLASelfAttention passes k_channels /
    v_channels, which DotProductAttention does not accept, and the context is v_head_dim (not
    kv_channels) wide per head."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, k_channels=None, v_channels=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout,
                         softmax_scale, cp_comm_type, pg_collection)
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition
