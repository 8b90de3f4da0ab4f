"""Gemma 3 text decoder (1B-27B; transformers' Gemma3ForCausalLM, model_type gemma3_text).

Reproduces transformers' model exactly (fp32 logits to rounding, at any TP/PP), with the modules of
gemma3_modules.py plugged into megatron-core 0.16.1's GPTModel through its ModuleSpec mechanism:
- "sandwich" norms: input and pre-feed-forward RMSNorms plus post-attention and post-feed-forward
  RMSNorms on the attention / MLP outputs before each residual add;
- RMSNorm as x * (1 + weight) in fp32 (zero-centred weight), for every norm: layer, QK and final;
- embeddings scaled by sqrt(hidden_size), the factor cast to the model dtype first (as transformers);
- separate rotary bases: sliding-window (local) layers `local_rotary_base` (HF rope_local_base_freq /
  rope_parameters.sliding_attention), global layers `rotary_base` with optional linear scaling
  (`rope_scaling_factor`, HF rope type "linear": 8 for 4B+);
- softmax scale query_pre_attn_scalar ** -0.5 (None = head_dim), GeGLU with tanh-approximated GELU,
  QK-norm, head_dim decoupled from hidden/heads, tied embeddings (default), a `sliding_window`-token
  window (the token itself included) on local layers; layers are local unless every
  `global_layer_every`-th (1-based), or as an explicit `layer_types` list.

Not supported (import refuses such configs): attention-logit and final-logit soft-capping (both None
in Gemma 3), bidirectional attention, rope types other than default (local) and default/linear
(global), attention biases. Not reproduced: the embedding's padding_idx (transformers never updates
row pad_token_id; we train it like any row). Flash-decode inference (precomputed cos/sin) is not
available on local layers. The Transformer Engine spec (TE linears and core attention with these
norms, never fused) is built but was only tested here without TE.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F

from megatron_mm.checkpoint import hf_rules
from megatron_mm.models.layers import counts
from megatron_mm.models.layers.decoder import DecoderConfig
from megatron_mm.models.layers.gemma3_modules import EmbeddingScale, gemma3_block_spec

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class Gemma3Config(DecoderConfig):
    family: str = "gemma3"
    head_dim: int = 256
    rotary_base: float = 1000000.0  # global layers
    local_rotary_base: float = 10000.0  # sliding-window layers
    rope_scaling_factor: Optional[float] = None  # linear position interpolation, global layers only
    norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = True
    sliding_window: int = 1024  # tokens each local-layer query sees, itself included
    global_layer_every: int = 6  # every sixth layer attends globally
    layer_types: Optional[list[str]] = None  # per layer "sliding_attention"/"full_attention"; wins over the above
    query_pre_attn_scalar: Optional[float] = None  # softmax scale = this ** -0.5; None = head_dim

    def local_layers(self) -> list[bool]:
        if self.layer_types is not None:
            return [kind == SLIDING for kind in self.layer_types]
        return [(layer + 1) % self.global_layer_every != 0 for layer in range(self.num_layers)]

    def family_transformer_fields(self) -> dict:
        local = self.local_layers()
        fields = {
            "qk_layernorm": True,
            "activation_func": functools.partial(F.gelu, approximate="tanh"),
            "softmax_scale": (self.query_pre_attn_scalar or self.kv_channels) ** -0.5,
        }
        if any(local):
            fields["window_size"] = (self.sliding_window - 1, 0)
            fields["window_attn_skip_freq"] = (self.global_layer_every if self.layer_types is None
                                               else [int(x) for x in local])
        return fields

    def family_model_kwargs(self) -> dict:
        return {"seq_len_interpolation_factor": self.rope_scaling_factor}

    def layer_spec(self, transformer_config, backend, vp_stage=None):
        return gemma3_block_spec(transformer_config, backend, self.local_rotary_base, vp_stage)

    def build(self, transformer_config, backend, pre_process: bool, post_process: bool, vp_stage=None):
        model = super().build(transformer_config, backend, pre_process, post_process, vp_stage)
        if pre_process:
            model.embedding.register_forward_hook(EmbeddingScale(self.hidden_size))
        return model

    def validate(self, parallel) -> list[str]:
        problems = []
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                problems.append(f"model.layer_types has {len(self.layer_types)} entries for {self.num_layers} layers")
            if set(self.layer_types) - {SLIDING, FULL}:
                problems.append(f"model.layer_types entries must be {SLIDING!r} or {FULL!r}")
        return problems

    def counts(self) -> counts.ModelCounts:
        post_norms = counts.norm(self.hidden_size) + counts.norm(self.hidden_size)  # after attention and MLP
        return counts.decoder_counts(self, layer_extra=post_norms)

    # ---- HuggingFace mapping ------------------------------------------------------------------
    HF_ARCHITECTURES = ("Gemma3ForCausalLM",)

    @classmethod
    def from_hf_config(cls, hf: dict) -> "Gemma3Config":
        problems: list[str] = []
        hf_rules.check_equal(hf, problems, "hidden_activation", "gelu_pytorch_tanh", "gelu_pytorch_tanh")
        hf_rules.check_equal(hf, problems, "attention_bias", False, False)
        hf_rules.check_equal(hf, problems, "attn_logit_softcapping", None)
        hf_rules.check_equal(hf, problems, "final_logit_softcapping", None)
        hf_rules.check_equal(hf, problems, "use_bidirectional_attention", False, False)
        (global_theta, global_scaling), (local_theta, local_scaling) = _hf_rope(hf)
        factor = None
        if global_scaling is not None:
            if global_scaling.get("rope_type") != "linear" or set(global_scaling) - {"rope_type", "factor"}:
                problems.append(f"global rope scaling {global_scaling!r} (only linear is supported)")
            factor = global_scaling.get("factor")
        if local_scaling is not None:
            problems.append(f"local (sliding_attention) rope scaling {local_scaling!r}")
        fields = hf_rules.decoder_fields_from_hf(hf, tie_default=True)
        layers = fields["num_layers"]
        layer_types = hf.get("layer_types")
        pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
        if layer_types is None:
            layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
        if set(layer_types) - {SLIDING, FULL} or len(layer_types) != layers:
            problems.append(f"layer_types={layer_types!r}")
        hf_rules.unsupported("Gemma3ForCausalLM", problems)
        derived = [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
        return cls(
            **fields, rotary_base=global_theta, local_rotary_base=local_theta, rope_scaling_factor=factor,
            sliding_window=hf.get("sliding_window") or 4096, global_layer_every=pattern,
            layer_types=None if list(layer_types) == derived else list(layer_types),
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        )

    def to_hf_config(self) -> dict:
        fields = hf_rules.decoder_fields_to_hf(self, "Gemma3ForCausalLM", "gemma3_text")
        global_scaling = None if self.rope_scaling_factor is None else {"rope_type": "linear",
                                                                         "factor": self.rope_scaling_factor}
        fields.update(
            head_dim=self.kv_channels,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=self.query_pre_attn_scalar or self.kv_channels,
            sliding_window=self.sliding_window,
            layer_types=[SLIDING if local else FULL for local in self.local_layers()],
            rope_parameters={FULL: hf_rules.rope_parameters(self.rotary_base, global_scaling),
                             SLIDING: hf_rules.rope_parameters(self.local_rotary_base)},
        )
        return fields

    def hf_rules(self) -> list:
        rules = hf_rules.embedding_rules(self)
        same = hf_rules.same
        for layer in range(self.num_layers):
            o, h = f"decoder.layers.{layer}", f"model.layers.{layer}"
            rules += [
                same(f"{o}.input_layernorm.weight", f"{h}.input_layernorm.weight"),
                hf_rules.fused_qkv(f"{o}.self_attention.linear_qkv.weight", f"{h}.self_attn.q_proj.weight",
                                   f"{h}.self_attn.k_proj.weight", f"{h}.self_attn.v_proj.weight",
                                   self.num_attention_heads, self.query_groups, self.kv_channels),
                same(f"{o}.self_attention.q_layernorm.weight", f"{h}.self_attn.q_norm.weight"),
                same(f"{o}.self_attention.k_layernorm.weight", f"{h}.self_attn.k_norm.weight"),
                same(f"{o}.self_attention.linear_proj.weight", f"{h}.self_attn.o_proj.weight"),
                same(f"{o}.self_attention.linear_proj.post_norm.weight", f"{h}.post_attention_layernorm.weight"),
                same(f"{o}.pre_mlp_layernorm.weight", f"{h}.pre_feedforward_layernorm.weight"),
                same(f"{o}.mlp.linear_fc2.post_norm.weight", f"{h}.post_feedforward_layernorm.weight"),
            ]
            rules += hf_rules.gated_mlp_rules(f"{o}.mlp", f"{h}.mlp")
        return rules


def _hf_rope(hf: dict) -> tuple[tuple[float, Optional[dict]], tuple[float, Optional[dict]]]:
    """((global theta, scaling), (local theta, scaling)) from transformers 5's per-layer-type
    `rope_parameters` or the hub's older rope_theta / rope_scaling / rope_local_base_freq."""
    params = hf.get("rope_parameters") or {}
    if FULL in params or SLIDING in params:
        full = params.get(FULL) or {}
        sliding = params.get(SLIDING) or {}
        global_ = hf_rules.rope_settings({"rope_parameters": {"rope_theta": 1000000.0, **full}})
        local = hf_rules.rope_settings({"rope_parameters": {"rope_theta": 10000.0, **sliding}})
        return global_, local
    global_ = hf_rules.rope_settings({"rope_theta": 1000000.0, **hf})
    return global_, (float(hf.get("rope_local_base_freq", 10000.0)), None)


CONFIG_CLASS = Gemma3Config
