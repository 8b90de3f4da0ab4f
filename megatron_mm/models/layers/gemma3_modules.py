"""The pieces of a Gemma 3 decoder layer that megatron-core 0.16.1 has no switch for, as small modules
that plug into its ModuleSpec / build_module mechanism (no megatron-core layer class is copied):

- `Gemma3RMSNorm`: RMSNorm computing x * (1 + w) in fp32 (zero-centred weight), as transformers does;
- `post_norm_linear(cls)`: a row-parallel linear (linear_proj / linear_fc2) whose reduced output goes
  through a Gemma3RMSNorm ("sandwich" norm) before the residual add;
- `Gemma3SelfAttention`: SelfAttention whose sliding-window (local) layers rotate queries and keys
  with their own rotary base instead of the model-wide (global) one;
- `EmbeddingScale`: a forward hook multiplying the embedding output by sqrt(hidden_size), the
  factor cast to the embedding dtype first, as transformers does;
- `gemma3_block_spec`: the block spec assembling them (every norm, the final one included, is ours).
"""

from __future__ import annotations

import functools
import math

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.utils import is_layer_window_attention


class Gemma3RMSNorm(torch.nn.Module):
    """y = x / rms(x) * (1 + w), computed in fp32 and cast back to x's dtype; w starts at zero.

    Built by megatron-core like its own norms (config, hidden_size, eps). Under sequence parallelism
    the weight is tagged `.sequence_parallel` so its gradient is summed over the TP group."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.float()
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


@functools.lru_cache(maxsize=None)
def post_norm_linear(linear_class: type) -> type:
    """`linear_class` (RowParallelLinear or TE's) with a Gemma3RMSNorm `post_norm` on its output.

    The norm acts after the TP reduction (all-reduce, or reduce-scatter under sequence parallelism,
    where it normalises whole hidden vectors of this rank's tokens), i.e. on the complete output."""

    class PostNormLinear(linear_class):
        def __init__(self, input_size, output_size, *args, config, **kwargs):
            super().__init__(input_size, output_size, *args, config=config, **kwargs)
            self.post_norm = Gemma3RMSNorm(config, output_size, eps=config.layernorm_epsilon)

        def forward(self, *args, **kwargs):
            output, bias = super().forward(*args, **kwargs)
            if bias is not None:  # a separate bias would have to be added before the norm
                raise NotImplementedError("Gemma 3 post-norm linears have no bias")
            return self.post_norm(output), None

    PostNormLinear.__name__ = PostNormLinear.__qualname__ = f"PostNorm{linear_class.__name__}"
    return PostNormLinear


class Gemma3SelfAttention(SelfAttention):
    """SelfAttention; a sliding-window layer replaces the model's rotary embedding (global base,
    computed once by GPTModel) with one of the same length from `local_rotary_base`."""

    def __init__(self, config, submodules, layer_number, attn_mask_type, *args,
                 local_rotary_base: float = 10000.0, **kwargs):
        super().__init__(config, submodules, layer_number, attn_mask_type, *args, **kwargs)
        self.is_local = is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                                  self.layer_number)
        self.local_rope = None
        if self.is_local:
            self.local_rope = RotaryEmbedding(
                kv_channels=config.kv_channels, rotary_percent=1.0,
                rotary_interleaved=config.rotary_interleaved, rotary_base=local_rotary_base,
                use_cpu_initialization=config.use_cpu_initialization)  # as GPTModel builds its own

    def local_rotary_pos_emb(self, global_emb: torch.Tensor, packed_seq_params) -> torch.Tensor:
        packed = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        cp_group = packed_seq_params.cp_group if packed_seq_params is not None else None
        group = cp_group if cp_group is not None else self.local_rope.cp_group
        seq_len = global_emb.shape[0]
        if not packed and group is not None and group.size() > 1:
            seq_len *= group.size()  # GPTModel's emb is this CP rank's share of the full one
        emb = self.local_rope(seq_len, packed_seq=packed, cp_group=cp_group)
        return emb.to(device=global_emb.device, dtype=global_emb.dtype)

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, rotary_pos_cos=None,
                rotary_pos_sin=None, packed_seq_params=None, **kwargs):
        if self.is_local:
            if rotary_pos_cos is not None or rotary_pos_sin is not None or kwargs.get("rotary_pos_cos_sin") is not None:
                raise NotImplementedError("Gemma 3 local layers: precomputed cos/sin (flash decode) unsupported")
            if isinstance(rotary_pos_emb, tuple):
                raise NotImplementedError("Gemma 3 local layers: separate q/k rotary embeddings unsupported")
            if rotary_pos_emb is not None:
                rotary_pos_emb = self.local_rotary_pos_emb(rotary_pos_emb, packed_seq_params)
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb,
                               rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                               packed_seq_params=packed_seq_params, **kwargs)


class EmbeddingScale:
    """Forward hook on GPTModel.embedding: output * sqrt(hidden_size), the factor rounded to the
    output's dtype first (transformers' Gemma3TextScaledWordEmbedding keeps it as an fp32 buffer and
    casts it to the weight dtype)."""

    def __init__(self, hidden_size: int):
        self.scale = torch.tensor(math.sqrt(hidden_size), dtype=torch.float32)

    def __call__(self, module, args, output):
        return output * self.scale.to(device=output.device, dtype=output.dtype)


def gemma3_block_spec(config, backend, local_rotary_base: float, vp_stage=None):
    """TransformerBlockSubmodules for this pipeline stage's Gemma 3 layers:

    input_layernorm -> attention (QK-norm (1+w), query_pre_attn_scalar via config.softmax_scale)
    -> linear_proj + post-attention norm -> residual; pre_mlp_layernorm -> GeGLU MLP -> linear_fc2 +
    post-feed-forward norm -> residual; final norm. Norms are never fused into TE linears, so the
    parameter names are the same with and without Transformer Engine."""
    from megatron.core.transformer.attention import SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

    layer = ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Gemma3RMSNorm,
            self_attention=ModuleSpec(
                module=Gemma3SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal, "local_rotary_base": local_rotary_base},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=backend.column_linear(),
                    core_attention=backend.core_attention(),
                    linear_proj=post_norm_linear(backend.row_linear()),
                    q_layernorm=Gemma3RMSNorm,
                    k_layernorm=Gemma3RMSNorm,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Gemma3RMSNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=backend.column_linear(),
                linear_fc2=post_norm_linear(backend.row_linear()))),
            mlp_bda=get_bias_dropout_add,
        ),
    )
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * count, layer_norm=Gemma3RMSNorm)
