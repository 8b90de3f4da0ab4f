"""What every encoder shares: its TransformerConfig, derived from the language model's in one place,
and the affine projector's linear."""

from __future__ import annotations

import dataclasses

from megatron.core.tensor_parallel.layers import ColumnParallelLinear


def encoder_config(language_config, **fields):
    """The language model's TransformerConfig as an encoder (or projector) starts from it: its
    precision and tensor parallelism, nothing else of its run. No experts; whole on the first pipeline
    stage without sequence or context parallelism; no recomputation or dropout (the encoders' own
    HuggingFace configs have none); linears with biases, no QK-norm, no fused bias-activation or RoPE
    kernels. `fields` (the encoder's shape, norm, activation) override all of it."""
    moe_defaults = {f.name: f.default for f in dataclasses.fields(language_config)
                    if (f.name.startswith("moe_") or f.name == "num_moe_experts")
                    and f.default is not dataclasses.MISSING}
    base = dict(
        **moe_defaults,
        expert_model_parallel_size=1,
        expert_tensor_parallel_size=None,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
        pipeline_model_parallel_layout=None,
        num_layers_in_first_pipeline_stage=None,
        num_layers_in_last_pipeline_stage=None,
        sequence_parallel=False,
        context_parallel_size=1,
        recompute_granularity=None,
        recompute_method=None,
        recompute_num_layers=None,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=True,
        add_qkv_bias=True,
        qk_layernorm=False,
        bias_activation_fusion=False,
        apply_rope_fusion=False,
    )
    return dataclasses.replace(language_config, **{**base, **fields})


class AffineProjectorLinear(ColumnParallelLinear):
    """The affine projector's linear, on every backend: it gathers its output across tensor-parallel
    ranks with the bias already added. megatron-core's affine MultimodalProjector asks for the bias
    apart (skip_bias_add) and would add this rank's shard of it to the gathered output; TE linears
    cannot gather."""

    def __init__(self, *args, skip_bias_add: bool = False, **kwargs):
        super().__init__(*args, skip_bias_add=False, **kwargs)
