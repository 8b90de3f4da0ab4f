"""Mixtral 8x7B / 8x22B: the Mistral layout with 8 SwiGLU experts per layer, softmax over the top-2
router logits."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mm.checkpoint import hf_rules
from megatron_mm.models.layers.moe_decoder import MoEDecoderConfig


@dataclass
class MixtralConfig(MoEDecoderConfig):
    family: str = "mixtral"
    rotary_base: float = 1000000.0
    num_experts: int = 8
    router_topk: int = 2

    # ---- HuggingFace mapping ------------------------------------------------------------------
    HF_ARCHITECTURES = ("MixtralForCausalLM",)

    @classmethod
    def from_hf_config(cls, hf: dict) -> "MixtralConfig":
        problems: list[str] = []
        hf_rules.check_dense_decoder(hf, problems)
        hf_rules.check_equal(hf, problems, "sliding_window", None)
        theta = hf_rules.plain_rope(hf, problems)
        moe = hf_rules.moe_fields_from_hf(hf, problems)
        hf_rules.unsupported("MixtralForCausalLM", problems)
        return cls(**hf_rules.decoder_fields_from_hf(hf), **moe, rotary_base=theta)

    def to_hf_config(self) -> dict:
        return {**hf_rules.decoder_fields_to_hf(self, "MixtralForCausalLM", "mixtral"),
                "rope_parameters": hf_rules.rope_parameters(self.rotary_base),
                "num_local_experts": self.num_experts, "num_experts_per_tok": self.router_topk,
                "router_aux_loss_coef": self.aux_loss_coeff}

    def hf_rules(self) -> list:
        return hf_rules.moe_decoder_rules(self, qk_norm=False, hf_mlp="block_sparse_moe",
                                          expert_weights=("w1", "w3", "w2"))


CONFIG_CLASS = MixtralConfig
