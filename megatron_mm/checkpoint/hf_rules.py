"""The vocabulary a family's HuggingFace mapping is written in.

A family lists `Rule`s: one of our parameters (its name in a one-rank model's state dict) and the
HuggingFace tensors it is made of, with the two transforms between them. The converter
(checkpoint/hf.py) knows nothing about any family; everything family-specific is in the rules and in
the family's `from_hf_config` / `to_hf_config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from megatron_mm.errors import UserError


class HFConversionError(UserError):
    """A HuggingFace checkpoint or config this mapping cannot convert; the message says what and why."""


def _one(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0]


def _as_list(tensor: torch.Tensor) -> list[torch.Tensor]:
    return [tensor]


@dataclass(frozen=True)
class Rule:
    ours: str  # e.g. "decoder.layers.3.self_attention.linear_qkv.weight"
    hf: tuple[str, ...]  # e.g. ("model.layers.3.self_attn.q_proj.weight", ...k_proj, ...v_proj)
    to_ours: Callable[[list[torch.Tensor]], torch.Tensor] = _one
    to_hf: Callable[[torch.Tensor], list[torch.Tensor]] = _as_list


def same(ours: str, hf: str) -> Rule:
    return Rule(ours, (hf,))


def fused_qkv(ours: str, q: str, k: str, v: str, heads: int, groups: int, head_dim: int) -> Rule:
    """megatron-core's linear_qkv holds, per query group, that group's query heads then its key and
    value head: [g0: q.. k v | g1: q.. k v | ...] along the output dimension."""
    per_group = heads // groups

    def to_ours(tensors):
        q_t, k_t, v_t = tensors
        rest = q_t.shape[1:]
        parts = (q_t.reshape(groups, per_group * head_dim, *rest), k_t.reshape(groups, head_dim, *rest),
                 v_t.reshape(groups, head_dim, *rest))
        return torch.cat(parts, dim=1).reshape(-1, *rest)

    def to_hf(tensor):
        rest = tensor.shape[1:]
        grouped = tensor.reshape(groups, (per_group + 2) * head_dim, *rest)
        q_t, k_t, v_t = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
        return [t.reshape(-1, *rest).contiguous() for t in (q_t, k_t, v_t)]

    return Rule(ours, (q, k, v), to_ours, to_hf)


def fused_gate_up(ours: str, gate: str, up: str) -> Rule:
    """A gated MLP's linear_fc1 is [gate; up]: megatron-core applies the activation to the first half."""

    def to_hf(tensor):
        return [t.contiguous() for t in torch.chunk(tensor, 2, dim=0)]

    return Rule(ours, (gate, up), lambda tensors: torch.cat(tensors, dim=0), to_hf)


def duplicated(ours: str, hf: Sequence[str]) -> Rule:
    """One of our tensors stored several times by HuggingFace (e.g. the MTP layer's copy of the
    embedding): every copy must be equal, since only one survives the import."""

    def to_ours(tensors):
        for name, tensor in zip(hf[1:], tensors[1:]):
            if tensor.is_meta or tensors[0].is_meta:  # shape-only check before converting
                continue
            if not torch.equal(tensor, tensors[0]):
                raise HFConversionError(f"{name} differs from {hf[0]}; this model keeps a single copy of them")
        return tensors[0]

    return Rule(ours, tuple(hf), to_ours, lambda tensor: [tensor] * len(hf))


def padded_rows(rule: Rule, vocab_size: int, padded_vocab_size: int) -> Rule:
    """`rule` for a vocabulary tensor (embedding, output head) whose rows we pad: zero rows appended
    on import, dropped on export. A tensor of another size is left as it is for the shape check."""

    def to_ours(tensors):
        tensor = rule.to_ours(tensors)
        if tensor.shape[0] != vocab_size:
            return tensor
        return torch.nn.functional.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, padded_vocab_size - vocab_size))

    return Rule(rule.ours, rule.hf, to_ours, lambda tensor: rule.to_hf(tensor[:vocab_size]))


# ---- config helpers ---------------------------------------------------------------------------
def rope_settings(hf: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, rope scaling dict or None) from either config style: transformers 5's
    `rope_parameters` or the older top-level `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters")
    if params:
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf.get("rope_scaling") or {})
    if scaling.get("type") and not scaling.get("rope_type"):
        scaling["rope_type"] = scaling.pop("type")
    if scaling.get("rope_type", "default") == "default":
        scaling = None
    return float(theta), scaling


def plain_rope(hf: dict, problems: list[str]) -> float:
    """rope_theta of a config whose family has no rope scaling (a scaled one is a problem)."""
    theta, scaling = rope_settings(hf)
    if scaling is not None:
        problems.append(f"rope scaling {scaling.get('rope_type')!r}")
    return theta


def rope_parameters(theta: float, scaling: Optional[dict] = None) -> dict:
    """The transformers-5 `rope_parameters` field for a config we write."""
    return {"rope_theta": theta, **(scaling or {"rope_type": "default"})}


def unsupported(architecture: str, problems: list[str]) -> None:
    """Raise one error naming every HuggingFace config field the mapping cannot represent."""
    if problems:
        raise HFConversionError(f"{architecture}: cannot represent " + "; ".join(problems))


def check_equal(hf: dict, problems: list[str], field: str, expected, default=None) -> None:
    value = hf.get(field, default)
    if value != expected:
        problems.append(f"{field}={value!r} (only {expected!r} is supported)")


# ---- the Llama-style decoder most families share -------------------------------------------------
def decoder_fields_from_hf(hf: dict, tie_default: bool = False) -> dict:
    """Our DecoderConfig fields from the HuggingFace fields every Llama-style config has."""
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    return dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        vocab_size=hf["vocab_size"],
        vocab_pad_multiple=1,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", tie_default)),
    )


def decoder_fields_to_hf(cfg, architecture: str, model_type: str) -> dict:
    fields = dict(
        architectures=[architecture],
        model_type=model_type,
        num_hidden_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.query_groups,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    if cfg.kv_channels != cfg.hidden_size // cfg.num_attention_heads:
        fields["head_dim"] = cfg.kv_channels  # HuggingFace derives it otherwise
    return fields


def check_dense_decoder(hf: dict, problems: list[str]) -> None:
    """The Llama-style fields our decoder has no switch for."""
    check_equal(hf, problems, "hidden_act", "silu", "silu")
    check_equal(hf, problems, "attention_bias", False, False)
    check_equal(hf, problems, "mlp_bias", False, False)


def embedding_rules(cfg) -> list[Rule]:
    rules = [same("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
             same("decoder.final_layernorm.weight", "model.norm.weight")]
    if not cfg.tie_word_embeddings:
        rules.append(same("output_layer.weight", "lm_head.weight"))
    return rules


def attention_rules(cfg, layer: int, qk_norm: bool, ours: str = "decoder.layers", hf: str = "model.layers") -> list[Rule]:
    o, h = f"{ours}.{layer}", f"{hf}.{layer}"
    rules = [
        same(f"{o}.input_layernorm.weight", f"{h}.input_layernorm.weight"),
        fused_qkv(f"{o}.self_attention.linear_qkv.weight", f"{h}.self_attn.q_proj.weight",
                  f"{h}.self_attn.k_proj.weight", f"{h}.self_attn.v_proj.weight",
                  cfg.num_attention_heads, cfg.query_groups, cfg.kv_channels),
        same(f"{o}.self_attention.linear_proj.weight", f"{h}.self_attn.o_proj.weight"),
        same(f"{o}.pre_mlp_layernorm.weight", f"{h}.post_attention_layernorm.weight"),
    ]
    if qk_norm:
        rules += [same(f"{o}.self_attention.q_layernorm.weight", f"{h}.self_attn.q_norm.weight"),
                  same(f"{o}.self_attention.k_layernorm.weight", f"{h}.self_attn.k_norm.weight")]
    return rules


def gated_mlp_rules(ours: str, hf: str, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj") -> list[Rule]:
    """A SwiGLU/GeGLU MLP: our `{ours}.linear_fc1/linear_fc2` from HuggingFace `{hf}.gate/up/down`."""
    return [fused_gate_up(f"{ours}.linear_fc1.weight", f"{hf}.{gate}.weight", f"{hf}.{up}.weight"),
            same(f"{ours}.linear_fc2.weight", f"{hf}.{down}.weight")]


def qkv_bias_rule(cfg, layer: int, ours: str = "decoder.layers", hf: str = "model.layers") -> Rule:
    """Our fused q/k/v bias from HuggingFace's three (Qwen2's decoders)."""
    o, h = f"{ours}.{layer}", f"{hf}.{layer}"
    return fused_qkv(f"{o}.self_attention.linear_qkv.bias", f"{h}.self_attn.q_proj.bias", f"{h}.self_attn.k_proj.bias",
                     f"{h}.self_attn.v_proj.bias", cfg.num_attention_heads, cfg.query_groups, cfg.kv_channels)


def dense_decoder_rules(cfg, qk_norm: bool, qkv_bias: bool = False) -> list[Rule]:
    """A Llama-layout decoder (Qwen2's adds q/k/v biases)."""
    rules = embedding_rules(cfg)
    for layer in range(cfg.num_layers):
        rules += attention_rules(cfg, layer, qk_norm)
        if qkv_bias:
            rules.append(qkv_bias_rule(cfg, layer))
        rules += gated_mlp_rules(f"decoder.layers.{layer}.mlp", f"model.layers.{layer}.mlp")
    return rules


def prefixed(rules: list[Rule], ours: str = "", hf: str = "") -> list[Rule]:
    """The rules of a sub-model: our names under `ours`, HuggingFace's under `hf` (prefixes with their dot)."""
    return [Rule(f"{ours}{rule.ours}", tuple(f"{hf}{name}" for name in rule.hf), rule.to_ours, rule.to_hf)
            for rule in rules]


def moe_rules(cfg, ours: str, hf: str, router: str = "gate", experts: str = "experts",
              expert_weights: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> list[Rule]:
    """A routed-expert MLP: our `{ours}.router` and `{ours}.experts.local_experts.{e}` from HuggingFace
    `{hf}.{router}` and `{hf}.{experts}.{e}.{gate,up,down}` (the hub's per-expert layout)."""
    rules = [same(f"{ours}.router.weight", f"{hf}.{router}.weight")]
    for expert in range(cfg.num_experts):
        rules += gated_mlp_rules(f"{ours}.experts.local_experts.{expert}", f"{hf}.{experts}.{expert}", *expert_weights)
    return rules


def moe_fields_from_hf(hf: dict, problems: list[str]) -> dict:
    """Routing fields shared by softmax top-k MoE configs (Mixtral, Qwen3-MoE)."""
    fields = dict(
        num_experts=hf.get("num_local_experts") or hf.get("num_experts"),
        router_topk=hf["num_experts_per_tok"],
        router_score_function="softmax",
        aux_loss_type="aux_loss",
        aux_loss_coeff=hf.get("router_aux_loss_coef", 0.0),
    )
    if hf.get("router_jitter_noise"):
        problems.append(f"router_jitter_noise={hf['router_jitter_noise']}")
    return fields


def moe_decoder_rules(cfg, qk_norm: bool, hf_mlp: str = "mlp", router: str = "gate",
                      expert_weights: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> list[Rule]:
    """A Llama-style decoder whose first `cfg.first_k_dense` layers have a dense MLP and the rest
    routed experts under `model.layers.{i}.{hf_mlp}`."""
    rules = embedding_rules(cfg)
    for layer in range(cfg.num_layers):
        rules += attention_rules(cfg, layer, qk_norm)
        ours, hf = f"decoder.layers.{layer}.mlp", f"model.layers.{layer}.{hf_mlp}"
        if layer < cfg.first_k_dense:
            rules += gated_mlp_rules(ours, hf)
        else:
            rules += moe_rules(cfg, ours, hf, router=router, expert_weights=expert_weights)
    return rules
