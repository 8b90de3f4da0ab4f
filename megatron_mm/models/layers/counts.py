"""Parameter counts and model FLOPs per token, from a family's config alone (no model is built).

A model is a list of `Part`s (embedding, each layer, final norm, output layer, multi-token
prediction layers) plus its encoders. Decoder parts are read from the same megatron-core
TransformerConfig fields the family builds from (`family_transformer_fields()`): GQA or MLA
attention, q/k/v biases, QK-norm, dense or MoE MLP per layer, sliding windows, MTP. A family
overrides a hook only for what megatron-core's fields do not say (Gemma 3's post-norms, an
encoder's shape).

Conventions:
- Parameters are those megatron-core builds on one unsharded rank, padded vocabulary rows included
  (the published figures of the example configs use vocabularies that need no padding).
- `active` is what one token passes through: the top-k routed experts, the shared experts and the
  router in place of all experts; everything else in full, the embedding included.
- Model FLOPs of one trained token: 2 per multiply-add of every matmul the token passes through
  (the output layer once for the main head and once per MTP layer), plus the attention scores and
  weighted values over the keys its query sees: causal, s/2 on average over a sequence of s; a
  w-token sliding window, w - w^2 / (2s). Backward costs two forwards (3 passes); full
  recomputation runs one more forward (4). Norms, biases, activations, softmax and rotary
  embeddings are elementwise and not counted.
- Encoders run once per media item (an image at its configured size / pixel budget, one audio
  clip); the decoder-token figure adds one item per modality per sequence, the layout of the
  caption and mock data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# The decoder defaults DecoderConfig.transformer_config() sets before a family's own fields.
DECODER_FIELD_DEFAULTS = {"normalization": "RMSNorm", "gated_linear_unit": True, "add_bias_linear": False,
                          "add_qkv_bias": False, "qk_layernorm": False}


@dataclass(frozen=True)
class Part:
    """One piece of a model, per token."""

    parameters: int = 0
    active: int = 0  # of `parameters`, those a token passes through
    macs: int = 0  # matmul multiply-adds per token, forward, core attention apart
    attention_width: int = 0  # core-attention multiply-adds per attended key: heads x (qk dim + v dim)
    window: Optional[int] = None  # keys a query sees at most, itself included; None: every earlier key

    def __add__(self, other: "Part") -> "Part":
        if self.window != other.window and self.attention_width and other.attention_width:
            raise ValueError("parts with different attention windows do not add")
        return Part(self.parameters + other.parameters, self.active + other.active, self.macs + other.macs,
                    self.attention_width + other.attention_width,
                    self.window if self.attention_width else other.window)


def dense(parameters: int, macs: int = 0, **kwargs) -> Part:
    """A part every token passes through in full."""
    return Part(parameters, parameters, macs, **kwargs)


def linear(inputs: int, outputs: int, bias: bool = False) -> Part:
    return dense(inputs * outputs + (outputs if bias else 0), inputs * outputs)


def norm(width: int, normalization: str = "RMSNorm") -> Part:
    return dense(width * (2 if normalization == "LayerNorm" else 1))


def attention(hidden: int, heads: int, groups: int, head_dim: int, qkv_bias: bool, output_bias: bool,
              qk_norm: Optional[str] = None, window: Optional[int] = None) -> Part:
    """Grouped-query self-attention: fused q/k/v (their biases), output projection, optional
    per-head RMSNorm/LayerNorm on queries and keys."""
    qkv = linear(hidden, (heads + 2 * groups) * head_dim, bias=qkv_bias)
    parts = qkv + linear(heads * head_dim, hidden, bias=output_bias)
    if qk_norm:
        parts = parts + norm(head_dim, qk_norm) + norm(head_dim, qk_norm)
    return parts + Part(attention_width=2 * heads * head_dim, window=window)


def multi_latent_attention(hidden: int, heads: int, q_lora_rank: Optional[int], kv_lora_rank: int,
                           qk_head_dim: int, rope_head_dim: int, v_head_dim: int) -> Part:
    """DeepSeek's MLA: queries directly or through a normed low-rank latent; keys and values from a
    normed kv latent, plus one decoupled rotary key shared by all heads."""
    q_dim = heads * (qk_head_dim + rope_head_dim)
    if q_lora_rank is None:
        query = linear(hidden, q_dim)
    else:
        query = linear(hidden, q_lora_rank) + norm(q_lora_rank) + linear(q_lora_rank, q_dim)
    key_value = (linear(hidden, kv_lora_rank + rope_head_dim) + norm(kv_lora_rank)
                 + linear(kv_lora_rank, heads * (qk_head_dim + v_head_dim)))
    output = linear(heads * v_head_dim, hidden)
    return query + key_value + output + Part(attention_width=heads * (qk_head_dim + rope_head_dim + v_head_dim))


def mlp(hidden: int, ffn: int, gated: bool, bias: bool = False) -> Part:
    """fc1 (two halves when gated) and fc2."""
    return linear(hidden, ffn * (2 if gated else 1), bias) + linear(ffn, hidden, bias)


def mixture_of_experts(hidden: int, experts: int, topk: int, expert_ffn: int, shared_ffn: int, gated: bool) -> Part:
    """Router, every expert built, the top-k of them active; a shared expert every token uses."""
    expert = mlp(hidden, expert_ffn, gated)
    routed = Part(experts * expert.parameters, topk * expert.active, topk * expert.macs)
    shared = mlp(hidden, shared_ffn, gated) if shared_ffn else Part()
    return linear(hidden, experts) + routed + shared


def attended_keys(window: Optional[int], seq_length: int) -> float:
    """Keys a query sees on average in a causal sequence of seq_length (at most `window`)."""
    if window is None or window >= seq_length:
        return seq_length / 2
    return window - window * window / (2 * seq_length)


def forward_macs(parts, seq_length: int) -> float:
    """Multiply-adds per token of a causal decoder's parts, core attention included."""
    return sum(p.macs + p.attention_width * attended_keys(p.window, seq_length) for p in parts)


@dataclass(frozen=True)
class EncoderCounts:
    """An encoder with its projector, per media item."""

    parameters: int
    macs_per_item: float  # forward multiply-adds per item, core attention included
    embeddings_per_item: int  # placeholder rows it gives the language model


def bidirectional_macs(tokens: int, parts) -> float:
    """Multiply-adds of parts applied to `tokens` tokens that all see one another (or their window)."""
    return sum(tokens * (p.macs + p.attention_width * min(tokens, p.window or tokens)) for p in parts)


@dataclass(frozen=True)
class ModelCounts:
    decoder: tuple[Part, ...]  # embedding, layers, final norm, output layer
    mtp: tuple[Part, ...] = ()  # multi-token-prediction layers, their extra output-layer pass included
    encoders: dict[str, EncoderCounts] = field(default_factory=dict)
    embedding: int = 0  # input embedding + an untied output layer

    @property
    def total(self) -> int:
        return self.decoder_total + self.mtp_total + self.encoder_total

    @property
    def active(self) -> int:
        """Per token of the decoder: routed experts count top-k; encoders in full."""
        return sum(p.active for p in self.decoder + self.mtp) + self.encoder_total

    @property
    def decoder_total(self) -> int:
        return sum(p.parameters for p in self.decoder)

    @property
    def mtp_total(self) -> int:
        return sum(p.parameters for p in self.mtp)

    @property
    def mtp_active(self) -> int:
        return sum(p.active for p in self.mtp)

    @property
    def encoder_total(self) -> int:
        return sum(e.parameters for e in self.encoders.values())

    def flops_per_token(self, seq_length: int, recompute: str = "none") -> float:
        """Model FLOPs of one trained decoder token (forward and backward); full recomputation adds
        a forward. Encoders: one item per modality per sequence."""
        passes = 4 if recompute == "full" else 3
        macs = forward_macs(self.decoder + self.mtp, seq_length)
        macs += sum(e.macs_per_item for e in self.encoders.values()) / seq_length
        return 2 * passes * macs


# ---- decoders ---------------------------------------------------------------------------------------
def decoder_layer_window(fields: dict, layer: int) -> Optional[int]:
    """The window of 0-based decoder `layer` as megatron-core decides it (window_size,
    window_attn_skip_freq), in keys seen; None: full causal attention."""
    window, skip = fields.get("window_size"), fields.get("window_attn_skip_freq")
    if not window:
        return None
    local = (skip is None or (layer + 1) % skip != 0) if not isinstance(skip, list) else bool(skip[layer])
    return window[0] + 1 if local else None


def decoder_attention(cfg, fields: dict, window: Optional[int]) -> Part:
    if fields.get("kv_lora_rank"):
        return multi_latent_attention(cfg.hidden_size, cfg.num_attention_heads, fields.get("q_lora_rank"),
                                      fields["kv_lora_rank"], fields["qk_head_dim"], fields["qk_pos_emb_head_dim"],
                                      fields["v_head_dim"])
    bias = fields["add_bias_linear"]
    return attention(cfg.hidden_size, cfg.num_attention_heads, cfg.query_groups, cfg.kv_channels,
                     qkv_bias=bias or fields["add_qkv_bias"], output_bias=bias,
                     qk_norm=fields["normalization"] if fields["qk_layernorm"] else None, window=window)


def decoder_mlp(cfg, fields: dict, moe: bool) -> Part:
    gated, h = fields["gated_linear_unit"], cfg.hidden_size
    if not moe:
        return mlp(h, cfg.ffn_hidden_size, gated, fields["add_bias_linear"])
    return mixture_of_experts(h, fields["num_moe_experts"], fields["moe_router_topk"], fields["moe_ffn_hidden_size"],
                              fields.get("moe_shared_expert_intermediate_size") or 0, gated)


def decoder_counts(cfg, layer_extra: Part = Part()) -> ModelCounts:
    """A DecoderConfig's counts; `layer_extra` is what a family adds to every layer beyond
    megatron-core's standard layer (e.g. Gemma 3's post-norms)."""
    fields = {**DECODER_FIELD_DEFAULTS, **cfg.family_transformer_fields()}
    h, normalization = cfg.hidden_size, fields["normalization"]
    moe_layers = fields.get("moe_layer_freq") or [0] * cfg.num_layers
    vocab = cfg.padded_vocab_size()

    def layer(index: int, moe: bool) -> Part:
        window = decoder_layer_window(fields, index) if index < cfg.num_layers else None
        return (norm(h, normalization) + decoder_attention(cfg, fields, window) + norm(h, normalization)
                + decoder_mlp(cfg, fields, moe) + layer_extra)

    logits = Part(macs=vocab * h)
    output = linear(h, vocab) if not cfg.tie_word_embeddings else logits
    parts = ((dense(vocab * h),) + tuple(layer(i, bool(moe_layers[i])) for i in range(cfg.num_layers))
             + (norm(h, normalization), output))
    # megatron-core builds each MTP layer like the last decoder layer, between two norms and a
    # projection of [embedding; hidden], and runs the shared output layer once more.
    mtp = tuple(norm(h, normalization) + norm(h, normalization) + linear(2 * h, h)
                + layer(cfg.num_layers, bool(moe_layers[-1])) + norm(h, normalization) + logits
                for _ in range(fields.get("mtp_num_layers") or 0))
    return ModelCounts(decoder=parts, mtp=mtp, embedding=vocab * h * (1 if cfg.tie_word_embeddings else 2))


# ---- encoders ---------------------------------------------------------------------------------------
def encoder_layer(hidden: int, heads: int, ffn: int, gated: bool, normalization: str,
                  window: Optional[int] = None) -> Part:
    """A pre-norm encoder layer with biased linears (ViTs, the Qwen2-VL tower, Whisper)."""
    return (norm(hidden, normalization) + attention(hidden, heads, heads, hidden // heads, True, True, window=window)
            + norm(hidden, normalization) + mlp(hidden, ffn, gated, bias=True))


def resampler_macs(queries: int, hidden: int, ffn: int, layers: int, context: int) -> float:
    """Learned queries cross-attending to `context` encoder tokens: q and output projections and the
    MLP on the queries, k/v on the context, every query seeing every token."""
    per_query = linear(hidden, hidden).macs * 2 + mlp(hidden, ffn, False).macs
    return layers * (queries * per_query + context * linear(hidden, 2 * hidden).macs + queries * context * 2 * hidden)


def resampler_parameters(queries: int, hidden: int, ffn: int, layers: int, out: int) -> int:
    layer = (norm(hidden, "LayerNorm") + linear(hidden, hidden, True) + linear(hidden, 2 * hidden, True)
             + linear(hidden, hidden, True) + norm(hidden, "LayerNorm") + mlp(hidden, ffn, False, True))
    # queries, context norm, layers, final norm, output linear
    return (queries * hidden + 2 * hidden + layers * layer.parameters + 2 * hidden
            + linear(hidden, out, True).parameters)
