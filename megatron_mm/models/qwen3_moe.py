"""Qwen3-MoE (30B-A3B, 235B-A22B): Qwen3 attention (QK-norm, GQA, head_dim 128) with 128 routed
experts, softmax top-8 with renormalised weights, no shared expert, every layer MoE."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mm.checkpoint import hf_rules
from megatron_mm.models.layers.moe_decoder import MoEDecoderConfig


@dataclass
class Qwen3MoEConfig(MoEDecoderConfig):
    family: str = "qwen3_moe"
    rotary_base: float = 1000000.0
    norm_epsilon: float = 1e-6
    num_experts: int = 128
    router_topk: int = 8

    def family_transformer_fields(self) -> dict:
        return {**super().family_transformer_fields(), "qk_layernorm": True}

    # ---- HuggingFace mapping ------------------------------------------------------------------
    HF_ARCHITECTURES = ("Qwen3MoeForCausalLM",)

    @classmethod
    def from_hf_config(cls, hf: dict) -> "Qwen3MoEConfig":
        problems: list[str] = []
        hf_rules.check_dense_decoder(hf, problems)
        hf_rules.check_equal(hf, problems, "use_sliding_window", False, False)
        hf_rules.check_equal(hf, problems, "decoder_sparse_step", 1, 1)
        dense = list(hf.get("mlp_only_layers") or [])
        if dense != list(range(len(dense))):
            problems.append(f"mlp_only_layers={dense} (only leading dense layers are supported)")
        theta = hf_rules.plain_rope(hf, problems)
        moe = hf_rules.moe_fields_from_hf(hf, problems)
        hf_rules.unsupported("Qwen3MoeForCausalLM", problems)
        # norm_topk_prob: softmax over the chosen k (= renormalised); otherwise softmax over all
        return cls(**hf_rules.decoder_fields_from_hf(hf), **moe, rotary_base=theta, first_k_dense=len(dense),
                   moe_ffn_hidden_size=hf["moe_intermediate_size"],
                   router_pre_softmax=not hf.get("norm_topk_prob", False))

    def to_hf_config(self) -> dict:
        return {**hf_rules.decoder_fields_to_hf(self, "Qwen3MoeForCausalLM", "qwen3_moe"),
                "rope_parameters": hf_rules.rope_parameters(self.rotary_base),
                "num_local_experts": self.num_experts, "num_experts_per_tok": self.router_topk,
                "moe_intermediate_size": self.moe_ffn_hidden_size or self.ffn_hidden_size,
                "norm_topk_prob": not self.router_pre_softmax, "decoder_sparse_step": 1,
                "mlp_only_layers": list(range(self.first_k_dense)), "router_aux_loss_coef": self.aux_loss_coeff}

    def hf_rules(self) -> list:
        return hf_rules.moe_decoder_rules(self, qk_norm=True)


CONFIG_CLASS = Qwen3MoEConfig
