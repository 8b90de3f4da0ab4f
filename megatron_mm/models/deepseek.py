"""DeepSeek-V3 / V2 (and Kimi K2, the same architecture with more experts).

Multi-Latent Attention (low-rank q and kv compression, decoupled RoPE heads, YaRN scaling), the first
k layers dense and the rest MoE with fine-grained routed experts plus shared experts, sigmoid router
scores normalised over the top-k and scaled, node-limited routing (groups), auxiliary-loss-free
balancing (a per-expert bias that only affects selection, updated after each step by
±rate x sign(load error) and kept in fp32 in checkpoints) plus a small sequence-wise auxiliary loss,
and multi-token prediction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_mm.checkpoint import hf_rules
from megatron_mm.models.layers.moe_decoder import MoEDecoderConfig

# transformers' DeepseekV3RMSNorm on the q/kv latents keeps its default epsilon; megatron-core uses
# the model's norm epsilon there too.
HF_LATENT_NORM_EPS = 1e-6


@dataclass
class DeepSeekConfig(MoEDecoderConfig):
    family: str = "deepseek_v3"
    # Multi-Latent Attention
    q_lora_rank: Optional[int] = 1536  # None: queries are projected directly (V2-Lite)
    kv_lora_rank: int = 512
    qk_head_dim: int = 128  # the non-rotary part of each query/key head
    qk_pos_emb_head_dim: int = 64  # the decoupled rotary part
    v_head_dim: int = 128
    # YaRN context extension; rotary_scaling_factor None = plain RoPE
    rotary_scaling_factor: Optional[float] = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0  # as in HuggingFace configs: used only when mscale_all_dim is non-zero
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
            **self._rope_fields(),
            # megatron-core's fused MLA RoPE is YaRN-only
            **({"apply_rope_fusion": False} if self.rotary_scaling_factor is None else {}),
            "mtp_num_layers": self.mtp_num_layers or None,  # megatron-core: None = no MTP
            "mtp_loss_scaling_factor": self.mtp_loss_weight,
        }

    def _rope_fields(self) -> dict:
        if self.rotary_scaling_factor is None:
            # factor 1 also keeps megatron-core's YaRN softmax-scale correction at 1
            return {"rope_type": "rope", "rotary_base": self.rotary_base, "rotary_scaling_factor": 1.0}
        return {
            "rope_type": "yarn",
            "rotary_base": self.rotary_base,
            "rotary_scaling_factor": self.rotary_scaling_factor,
            "original_max_position_embeddings": self.original_max_position_embeddings,
            "beta_fast": self.beta_fast,
            "beta_slow": self.beta_slow,
            # megatron-core always divides the rotary mscale by mscale_all_dim's; HuggingFace ignores
            # mscale when mscale_all_dim is 0, which megatron-core's mscale 1 reproduces.
            "mscale": self.mscale if self.mscale_all_dim else 1.0,
            "mscale_all_dim": self.mscale_all_dim,
        }

    @property
    def kv_channels(self) -> int:
        return self.qk_head_dim + self.qk_pos_emb_head_dim

    def layer_spec(self, transformer_config, backend, vp_stage=None):
        spec = super().layer_spec(transformer_config, backend, vp_stage)
        for layer in spec.layer_specs:
            layer.submodules.self_attention.submodules.core_attention = backend.mla_core_attention()
        return spec

    def extra_model_kwargs(self, transformer_config, layer_spec, backend, vp_stage) -> dict:
        if not self.mtp_num_layers:
            return {}
        return {"mtp_block_spec": backend.mtp_block_spec(transformer_config, layer_spec, vp_stage)}

    def validate(self, parallel) -> list[str]:
        problems = super().validate(parallel)
        if self.mtp_num_layers and parallel.vpp:
            problems.append("multi-token prediction with parallel.vpp is not supported by megatron-core 0.16.1")
        return problems

    # ---- HuggingFace mapping ------------------------------------------------------------------
    HF_ARCHITECTURES = ("DeepseekV3ForCausalLM",)

    @classmethod
    def from_hf_config(cls, hf: dict) -> "DeepSeekConfig":
        problems: list[str] = []
        for field, value in (("hidden_act", "silu"), ("attention_bias", False), ("rope_interleave", True),
                             # hub config fields transformers ignores: it hard-codes these values
                             ("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
            hf_rules.check_equal(hf, problems, field, value, value)
        heads, topk = hf["num_attention_heads"], hf["num_experts_per_tok"]
        if (hf.get("num_key_value_heads") or heads) != heads:
            problems.append(f"num_key_value_heads={hf['num_key_value_heads']} (MLA expands kv to every head)")
        eps = hf.get("rms_norm_eps", HF_LATENT_NORM_EPS)
        if eps != HF_LATENT_NORM_EPS:
            problems.append(f"rms_norm_eps={eps} (transformers keeps {HF_LATENT_NORM_EPS} on the MLA latent norms, "
                            "megatron-core uses one epsilon for all)")
        if bool(hf.get("norm_topk_prob", True)) != (topk > 1):
            problems.append(f"norm_topk_prob={hf.get('norm_topk_prob')} with num_experts_per_tok={topk} "
                            "(megatron-core's sigmoid router normalises exactly when top-k > 1)")
        groups, group_topk = hf.get("n_group") or 1, hf.get("topk_group") or 1
        limited = group_topk < groups
        if limited and topk // group_topk != 2:
            problems.append(f"num_experts_per_tok={topk} with topk_group={group_topk}: megatron-core ranks groups "
                            "by their top-(top-k / topk_group) scores, transformers by their top 2")
        mtp_layers = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers")) or 0
        first_dense = hf.get("first_k_dense_replace") or 0
        if mtp_layers and first_dense >= hf["num_hidden_layers"]:
            problems.append("multi-token prediction on a model without MoE layers (megatron-core builds the MTP "
                            "layer like the last decoder layer; DeepSeek's is MoE)")
        theta, scaling = hf_rules.rope_settings(hf)
        rope = {"rotary_scaling_factor": None} if scaling is None else _yarn_from_hf(hf, scaling, problems)
        hf_rules.unsupported("DeepseekV3ForCausalLM", problems)
        moe_width = hf["moe_intermediate_size"]
        return cls(
            **{**hf_rules.decoder_fields_from_hf(hf), "head_dim": None, "num_query_groups": None},
            rotary_base=theta,
            **rope,
            q_lora_rank=hf.get("q_lora_rank"),
            kv_lora_rank=hf["kv_lora_rank"],
            qk_head_dim=hf["qk_nope_head_dim"],
            qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"],
            num_experts=hf["n_routed_experts"],
            moe_ffn_hidden_size=moe_width,
            shared_expert_ffn_hidden_size=(hf.get("n_shared_experts") or 0) * moe_width or None,
            first_k_dense=first_dense,
            router_topk=topk,
            router_num_groups=groups if limited else None,
            router_group_topk=group_topk if limited else None,
            router_topk_scaling_factor=hf.get("routed_scaling_factor", 1.0),
            mtp_num_layers=mtp_layers or None,
        )

    def to_hf_config(self) -> dict:
        scaling = None
        if self.rotary_scaling_factor is not None:
            scaling = {"rope_type": "yarn", "factor": self.rotary_scaling_factor,
                       "original_max_position_embeddings": self.original_max_position_embeddings,
                       "beta_fast": self.beta_fast, "beta_slow": self.beta_slow, "mscale": self.mscale,
                       "mscale_all_dim": self.mscale_all_dim}
        moe_width = self.moe_ffn_hidden_size or self.ffn_hidden_size
        return {
            **hf_rules.decoder_fields_to_hf(self, "DeepseekV3ForCausalLM", "deepseek_v3"),
            "head_dim": self.qk_pos_emb_head_dim,  # what transformers derives and saves
            "qk_head_dim": self.kv_channels,
            "q_lora_rank": self.q_lora_rank,
            "kv_lora_rank": self.kv_lora_rank,
            "qk_nope_head_dim": self.qk_head_dim,
            "qk_rope_head_dim": self.qk_pos_emb_head_dim,
            "v_head_dim": self.v_head_dim,
            "rope_interleave": True,
            "rope_parameters": hf_rules.rope_parameters(self.rotary_base, scaling),
            "n_routed_experts": self.num_experts,
            "moe_intermediate_size": moe_width,
            "n_shared_experts": (self.shared_expert_ffn_hidden_size or 0) // moe_width,
            "first_k_dense_replace": self.first_k_dense,
            "num_experts_per_tok": self.router_topk,
            "n_group": self.router_num_groups or 1,
            "topk_group": self.router_group_topk or 1,
            "routed_scaling_factor": self.router_topk_scaling_factor or 1.0,
            "norm_topk_prob": self.router_topk > 1,
            "num_nextn_predict_layers": self.mtp_num_layers or 0,
        }

    def hf_rules(self) -> list:
        rules = []
        for layer in range(self.num_layers):
            moe = layer >= self.first_k_dense
            rules += self._layer_rules(f"decoder.layers.{layer}", f"model.layers.{layer}", moe)
        # HuggingFace stores MTP layer k after the decoder layers, with its own copies of the
        # embedding and the output head.
        mtp = [f"model.layers.{self.num_layers + k}" for k in range(self.mtp_num_layers or 0)]
        heads = ["lm_head.weight"] + [f"{hf}.shared_head.head.weight" for hf in mtp]
        embeddings = ["model.embed_tokens.weight"] + [f"{hf}.embed_tokens.weight" for hf in mtp]
        if self.tie_word_embeddings:
            embeddings += heads
        else:
            rules.append(hf_rules.duplicated("output_layer.weight", heads))
        rules += [hf_rules.duplicated("embedding.word_embeddings.weight", embeddings),
                  hf_rules.same("decoder.final_layernorm.weight", "model.norm.weight")]
        for k, hf in enumerate(mtp):
            ours = f"mtp.layers.{k}"
            rules += [hf_rules.same(f"{ours}.{name}.weight", f"{hf}.{name}.weight")
                      for name in ("enorm", "hnorm", "eh_proj")]
            rules.append(hf_rules.same(f"{ours}.final_layernorm.weight", f"{hf}.shared_head.norm.weight"))
            rules += self._layer_rules(f"{ours}.transformer_layer", hf, moe=True)
        return rules

    def _layer_rules(self, ours: str, hf: str, moe: bool) -> list:
        attention = [("linear_kv_down_proj", "kv_a_proj_with_mqa"), ("kv_layernorm", "kv_a_layernorm"),
                     ("linear_kv_up_proj", "kv_b_proj"), ("linear_proj", "o_proj")]
        if self.q_lora_rank is None:
            attention.append(("linear_q_proj", "q_proj"))
        else:
            attention += [("linear_q_down_proj", "q_a_proj"), ("q_layernorm", "q_a_layernorm"),
                          ("linear_q_up_proj", "q_b_proj")]
        rules = [hf_rules.same(f"{ours}.self_attention.{o}.weight", f"{hf}.self_attn.{h}.weight") for o, h in attention]
        rules += [hf_rules.same(f"{ours}.input_layernorm.weight", f"{hf}.input_layernorm.weight"),
                  hf_rules.same(f"{ours}.pre_mlp_layernorm.weight", f"{hf}.post_attention_layernorm.weight")]
        if not moe:
            return rules + hf_rules.gated_mlp_rules(f"{ours}.mlp", f"{hf}.mlp")
        rules += hf_rules.moe_rules(self, f"{ours}.mlp", f"{hf}.mlp")
        rules.append(hf_rules.same(f"{ours}.mlp.router.expert_bias", f"{hf}.mlp.gate.e_score_correction_bias"))
        if self.shared_expert_ffn_hidden_size:
            rules += hf_rules.gated_mlp_rules(f"{ours}.mlp.shared_experts", f"{hf}.mlp.shared_experts")
        return rules


def _yarn_from_hf(hf: dict, scaling: dict, problems: list[str]) -> dict:
    """Our YaRN fields from a HuggingFace rope scaling dict (transformers' _compute_yarn_parameters)."""
    if scaling.get("rope_type") != "yarn":
        problems.append(f"rope scaling {scaling.get('rope_type')!r} (only yarn is supported)")
        return {}
    for key, allowed in (("attention_factor", None), ("truncate", True), ("partial_rotary_factor", 1.0)):
        if scaling.get(key, allowed) != allowed:
            problems.append(f"rope {key}={scaling[key]!r} (megatron-core's YaRN has no such setting)")
    original = scaling["original_max_position_embeddings"]
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim") or 0.0
    if mscale_all_dim and not mscale:
        problems.append(f"rope mscale={mscale!r} with mscale_all_dim={mscale_all_dim} (megatron-core scales "
                        "the rotary embedding by their ratio)")
    return dict(
        rotary_scaling_factor=scaling.get("factor") or hf["max_position_embeddings"] / original,
        original_max_position_embeddings=original,
        beta_fast=scaling.get("beta_fast") or 32.0,
        beta_slow=scaling.get("beta_slow") or 1.0,
        mscale=mscale if mscale is not None else 1.0,
        mscale_all_dim=mscale_all_dim,
    )


CONFIG_CLASS = DeepSeekConfig
