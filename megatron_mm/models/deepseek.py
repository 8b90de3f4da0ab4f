"""DeepSeek-V3 / V2 (and Kimi K2, the same architecture with more experts).

Multi-Latent Attention (low-rank q and kv compression, decoupled RoPE heads, YaRN scaling), the first
k layers dense and the rest MoE with fine-grained routed experts plus shared experts, sigmoid router
scores normalised over the top-k and scaled, node-limited routing (groups), auxiliary-loss-free
balancing (a per-expert bias that only affects selection, updated after each step by
±rate x sign(load error) and kept in fp32 in checkpoints) plus a small sequence-wise auxiliary loss,
and multi-token prediction.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

from megatron_mm.models.moe_decoder import MoEDecoderConfig


@dataclass
class DeepSeekConfig(MoEDecoderConfig):
    family: str = "deepseek_v3"
    # Multi-Latent Attention
    q_lora_rank: Optional[int] = 1536  # None: queries are projected directly (V2-Lite)
    kv_lora_rank: int = 512
    qk_head_dim: int = 128  # the non-rotary part of each query/key head
    qk_pos_emb_head_dim: int = 64  # the decoupled rotary part
    v_head_dim: int = 128
    # YaRN context extension
    rotary_scaling_factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    # MoE, DeepSeek-V3 defaults
    num_experts: int = 256
    first_k_dense: int = 3
    router_topk: int = 8
    router_score_function: str = "sigmoid"
    router_num_groups: Optional[int] = 8
    router_group_topk: Optional[int] = 4
    router_topk_scaling_factor: Optional[float] = 2.5
    expert_bias: bool = True
    aux_loss_type: str = "seq_aux_loss"
    aux_loss_coeff: float = 1.0e-4
    # Multi-token prediction
    mtp_num_layers: Optional[int] = 1
    mtp_loss_weight: float = 0.1

    def transformer_config_class(self):
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        return MLATransformerConfig

    def family_transformer_fields(self) -> dict:
        return {
            **super().family_transformer_fields(),
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_head_dim": self.qk_head_dim,
            "qk_pos_emb_head_dim": self.qk_pos_emb_head_dim,
            "v_head_dim": self.v_head_dim,
            "qk_layernorm": True,  # RMSNorm on the compressed q and kv latents
            "rope_type": "yarn",
            "rotary_base": self.rotary_base,
            "rotary_scaling_factor": self.rotary_scaling_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
            "mscale": self.mscale,
            "mscale_all_dim": self.mscale_all_dim,
            "mtp_num_layers": self.mtp_num_layers,
            "mtp_loss_scaling_factor": self.mtp_loss_weight,
        }

    @property
    def kv_channels(self) -> int:
        return self.qk_head_dim + self.qk_pos_emb_head_dim

    def layer_spec(self, transformer_config, use_te: bool, vp_stage=None):
        spec = super().layer_spec(transformer_config, use_te, vp_stage)
        if not use_te:
            for layer in spec.layer_specs:
                layer.submodules.self_attention.submodules.core_attention = _local_mla_core_attention()
        return spec

    def extra_model_kwargs(self, transformer_config, layer_spec, use_te: bool, vp_stage) -> dict:
        if not self.mtp_num_layers:
            return {}
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

        return {"mtp_block_spec": get_gpt_mtp_block_spec(transformer_config, layer_spec, use_te, vp_stage=vp_stage)}

    def validate(self, parallel) -> list[str]:
        problems = super().validate(parallel)
        if self.mtp_num_layers and parallel.vpp:
            problems.append("multi-token prediction with parallel.vpp is not supported by megatron-core 0.16.1")
        return problems


@functools.lru_cache(maxsize=None)
def _local_mla_core_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class LocalMLACoreAttention(DotProductAttention):
        """megatron-core's torch attention for MLA without Transformer Engine: 0.16.1's
        MLASelfAttention passes k_channels/v_channels, which DotProductAttention does not accept, and
        the context is v_head_dim (not kv_channels) wide per head."""

        def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                     softmax_scale=None, k_channels=None, v_channels=None, cp_comm_type=None, pg_collection=None):
            super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout,
                             softmax_scale, cp_comm_type, pg_collection)
            if v_channels is not None:
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    return LocalMLACoreAttention


CONFIG_CLASS = DeepSeekConfig
