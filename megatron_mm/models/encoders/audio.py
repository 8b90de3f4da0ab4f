"""Whisper-style audio encoder and its projector into the language model (Qwen2-Audio style), on
megatron-core layers so that tensor parallelism, checkpoints and both backends work as for text.

Input: `audio_features` [clips, num_mel_bins, frames], log-mel from data/audio_features.py (every
clip one fixed chunk). Encoder: conv1d (kernel 3, padding 1) + GELU, conv1d (kernel 3, stride 2,
padding 1) + GELU, fixed sinusoidal positions, pre-LN transformer layers (LayerNorm, biased
linears, exact-GELU MLP, attention over the whole clip), a final LayerNorm. Projector: average
pooling over `pooling_stride` frames, then a linear (affine) or two-layer GELU MLP into the language
model's width. As in Qwen2-Audio the pooling sits between the last layer and the final norm, so with
`pooling_stride=1` the encoder is exactly Whisper's.

Output: [clips * embeddings_per_clip, language hidden], clip by clip, frames in order: the rows the
language model's audio placeholders take (data/audio_features.encoder_output_length).

Whisper's key projection has no bias; megatron-core's fused q/k/v has one for all three. A key bias
adds the same q.b_k to every score of a query, which softmax ignores, so HuggingFace weights import
with a zero key bias and export without it. The positions are a frozen parameter initialised to
Whisper's sinusoids: checkpoints store them, and import reads them as they are.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_mm.checkpoint.hf_rules import Rule, fused_qkv, same
from megatron_mm.data.audio_features import HOP_LENGTH, MEL_BINS, SAMPLE_RATE, encoder_output_length
from megatron_mm.models.encoders.common import AffineProjectorLinear, encoder_config
from megatron_mm.models.layers import counts

PROJECTOR_TYPES = ("affine", "mlp")


@dataclass
class AudioEncoderConfig:
    num_mel_bins: int = 80
    hidden_size: int = 64
    num_layers: int = 2
    num_attention_heads: int = 4
    ffn_hidden_size: int = 256
    max_source_positions: int = 50  # positions after the stride-2 convolution (Whisper: 1500 = 30 s)
    norm_epsilon: float = 1e-5
    pooling_stride: int = 2  # the projector's average pooling over frames (Qwen2-Audio: 2; 1: none)
    projector_type: str = "affine"  # affine (Qwen2-Audio: one linear) | mlp (linear, GELU, linear)
    projector_ffn_hidden_size: int = 256  # hidden width of the MLP projector
    chunk_seconds: float = 0.0  # every clip padded or trimmed to this; 0: the longest the positions allow

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def clip_seconds(self) -> float:
        """The chunk every clip is cut to, seconds."""
        return self.chunk_seconds or 2 * self.max_source_positions * HOP_LENGTH / SAMPLE_RATE

    @property
    def num_frames(self) -> int:
        """Mel frames per clip."""
        return round(self.clip_seconds * SAMPLE_RATE) // HOP_LENGTH

    @property
    def embeddings_per_clip(self) -> int:
        return encoder_output_length(self.num_frames, self.pooling_stride)

    def validate(self, parallel) -> list[str]:
        problems = []
        if self.num_mel_bins not in MEL_BINS:
            problems.append(f"audio num_mel_bins={self.num_mel_bins} is not one of {MEL_BINS}")
        if self.projector_type not in PROJECTOR_TYPES:
            problems.append(f"audio projector_type={self.projector_type!r} is not one of {', '.join(PROJECTOR_TYPES)}")
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"audio hidden_size={self.hidden_size} is not divisible by "
                            f"num_attention_heads={self.num_attention_heads}")
        if self.hidden_size % 2 or self.hidden_size < 4:
            problems.append(f"audio hidden_size={self.hidden_size}: sinusoidal positions need an even width >= 4")
        if self.num_layers < 1 or self.pooling_stride < 1:
            problems.append("audio num_layers and pooling_stride must be positive")
        chunk_samples = round(self.clip_seconds * SAMPLE_RATE)
        if chunk_samples <= 0 or chunk_samples % HOP_LENGTH:
            problems.append(f"audio chunk_seconds={self.chunk_seconds} is not a positive multiple of "
                            f"{HOP_LENGTH / SAMPLE_RATE} s (one hop)")
        elif (self.num_frames + 1) // 2 > self.max_source_positions:
            problems.append(f"audio chunk_seconds={self.chunk_seconds} needs {(self.num_frames + 1) // 2} positions; "
                            f"max_source_positions={self.max_source_positions}")
        elif self.embeddings_per_clip < 1:
            problems.append(f"audio chunk_seconds={self.chunk_seconds} gives no embedding after pooling")
        divisible = [("num_attention_heads", self.num_attention_heads), ("ffn_hidden_size", self.ffn_hidden_size)]
        if self.projector_type == "mlp":
            divisible.append(("projector_ffn_hidden_size", self.projector_ffn_hidden_size))
        for name, value in divisible:
            if value % parallel.tp:
                problems.append(f"audio {name}={value} is not divisible by parallel.tp={parallel.tp}")
        return problems

    def processor(self):
        """The data pipeline's processor for this encoder: waveform -> log-mel chunk, placeholders."""
        from megatron_mm.data.audio_features import AudioProcessor

        return AudioProcessor(self.num_mel_bins, self.clip_seconds, self.pooling_stride)

    def counts(self, language_hidden_size: int) -> counts.EncoderCounts:
        """Encoder and projector per clip: the convolutions over its frames, the layers over the
        strided positions, the projector over the pooled embeddings (models/layers/counts.py)."""
        h, frames, embeddings = self.hidden_size, self.num_frames, self.embeddings_per_clip
        positions = (frames + 1) // 2  # after the stride-2 convolution
        conv1, conv2 = counts.linear(3 * self.num_mel_bins, h, bias=True), counts.linear(3 * h, h, bias=True)
        layers = [counts.encoder_layer(h, self.num_attention_heads, self.ffn_hidden_size, False, "LayerNorm")
                  ] * self.num_layers
        if self.projector_type == "mlp":
            projector = (counts.linear(h, self.projector_ffn_hidden_size, bias=True)
                         + counts.linear(self.projector_ffn_hidden_size, language_hidden_size, bias=True))
        else:
            projector = counts.linear(h, language_hidden_size, bias=True)
        parameters = (conv1.parameters + conv2.parameters + self.max_source_positions * h
                      + sum(layer.parameters for layer in layers) + counts.norm(h, "LayerNorm").parameters
                      + projector.parameters)
        macs = (frames * conv1.macs + positions * conv2.macs + counts.bidirectional_macs(positions, layers)
                + embeddings * projector.macs)
        return counts.EncoderCounts(parameters, macs, embeddings)

    # ---- megatron-core configs and specs -------------------------------------------------------
    def encoder_transformer_config(self, language_config):
        """The encoder layers' TransformerConfig: the language config's precision and TP with this
        encoder's shape; no PP/SP/CP or recomputation (the encoder runs whole on the first stage)."""
        return encoder_config(
            language_config,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_attention_heads,
            kv_channels=self.head_dim,
            layernorm_epsilon=self.norm_epsilon,
            normalization="LayerNorm",
            gated_linear_unit=False,
            activation_func=F.gelu,
        )

    def projector_transformer_config(self, language_config):
        """The projector's output is the language model's width (config.hidden_size)."""
        return dataclasses.replace(
            self.encoder_transformer_config(language_config),
            hidden_size=language_config.hidden_size,
            num_attention_heads=language_config.num_attention_heads,
            num_query_groups=language_config.num_query_groups,
            kv_channels=language_config.kv_channels,
            ffn_hidden_size=self.projector_ffn_hidden_size,
        )


def sinusoidal_positions(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """[length, channels]: sines then cosines of position / max_timescale^(i / (channels/2 - 1))."""
    half = channels // 2
    inverse_timescales = torch.exp(-math.log(max_timescale) / (half - 1) * torch.arange(half, dtype=torch.float32))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inverse_timescales[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class AudioEncoder(MegatronModule):
    """log-mel chunks -> convolutions -> transformer layers -> pooling -> norm -> projector."""

    MEDIA_KEYS = ("audio_features",)

    def __init__(self, audio: AudioEncoderConfig, language_config, backend):
        from megatron.core.models.vision.multimodal_projector import MultimodalProjector
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.transformer.mlp import MLPSubmodules
        from megatron.core.transformer.spec_utils import build_module
        from megatron.core.transformer.transformer_block import TransformerBlock

        config = audio.encoder_transformer_config(language_config)
        super().__init__(config=config)
        self.audio = audio
        h, dtype = audio.hidden_size, config.params_dtype
        # The convolutions are small and replicated across tensor-parallel ranks.
        self.conv1 = torch.nn.Conv1d(audio.num_mel_bins, h, kernel_size=3, padding=1, dtype=dtype)
        self.conv2 = torch.nn.Conv1d(h, h, kernel_size=3, stride=2, padding=1, dtype=dtype)
        self.position_embeddings = torch.nn.Parameter(
            sinusoidal_positions(audio.max_source_positions, h).to(dtype), requires_grad=False)
        self.block = TransformerBlock(config, backend.encoder_layer_spec(AttnMaskType.no_mask), post_layer_norm=False)
        self.final_layernorm = build_module(backend.norm(), config=config, hidden_size=h, eps=audio.norm_epsilon)
        fc1 = backend.column_linear() if audio.projector_type == "mlp" else AffineProjectorLinear
        self.projector = MultimodalProjector(audio.projector_transformer_config(language_config),
                                             MLPSubmodules(linear_fc1=fc1, linear_fc2=backend.row_linear()),
                                             audio.projector_type, h)

    def features(self, audio_features: torch.Tensor) -> torch.Tensor:
        """[clips, num_mel_bins, frames] -> [clips, embeddings, encoder hidden]: the encoder's states
        after pooling and the final norm (Whisper's last hidden state when pooling_stride is 1)."""
        x = audio_features.to(self.conv1.weight.dtype)
        x = F.gelu(self.conv2(F.gelu(self.conv1(x))))  # [clips, h, positions]
        positions = x.shape[-1]
        if positions > self.audio.max_source_positions:
            raise ValueError(f"{audio_features.shape[-1]} mel frames need {positions} positions; the encoder "
                             f"has {self.audio.max_source_positions}")
        x = x.permute(2, 0, 1) + self.position_embeddings[:positions, None, :]  # [s, b, h]
        x = self.block(x.contiguous(), attention_mask=None)
        stride = self.audio.pooling_stride
        if stride > 1:  # average of each whole window of `stride` frames; a remainder is dropped
            kept = positions // stride
            x = x[:kept * stride].reshape(kept, stride, *x.shape[1:]).mean(dim=1)
        return self.final_layernorm(x).transpose(0, 1)

    def forward(self, audio_features: torch.Tensor) -> torch.Tensor:
        states = self.features(audio_features)
        return self.projector(states.reshape(-1, states.shape[-1]))


# ---- HuggingFace WhisperEncoder / Qwen2AudioEncoder + Qwen2-Audio's projector ----------------------
def _joined(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def qkv_bias_without_key(ours: str, q: str, v: str, heads: int, head_dim: int) -> Rule:
    """Our fused q/k/v bias from biases of q and v only: the key bias is zero on import and dropped
    on export (softmax cannot see it)."""
    per_head = fused_qkv(ours, q, "k", v, heads, heads, head_dim)

    def to_ours(tensors):
        q_bias, v_bias = tensors
        return per_head.to_ours([q_bias, torch.zeros_like(q_bias), v_bias])

    def to_hf(tensor):
        q_bias, _, v_bias = per_head.to_hf(tensor)
        return [q_bias, v_bias]

    return Rule(ours, (q, v), to_ours, to_hf)


def audio_encoder_hf_rules(audio: AudioEncoderConfig, ours: str = "encoders.audio",
                           hf: str = "audio_tower") -> list[Rule]:
    """Our encoder's tensors (under `ours`, the projector excepted) from a transformers
    WhisperEncoder or Qwen2AudioEncoder (under `hf`: `audio_tower` in Qwen2-Audio checkpoints,
    `model.encoder` in Whisper's)."""
    o, h = (lambda name: _joined(ours, name)), (lambda name: _joined(hf, name))
    heads, head_dim = audio.num_attention_heads, audio.head_dim
    rules = [same(o(f"{conv}.{t}"), h(f"{conv}.{t}")) for conv in ("conv1", "conv2") for t in ("weight", "bias")]
    rules.append(same(o("position_embeddings"), h("embed_positions.weight")))
    for i in range(audio.num_layers):
        layer, block = o(f"block.layers.{i}"), h(f"layers.{i}")
        rules += [
            fused_qkv(f"{layer}.self_attention.linear_qkv.weight", f"{block}.self_attn.q_proj.weight",
                      f"{block}.self_attn.k_proj.weight", f"{block}.self_attn.v_proj.weight", heads, heads, head_dim),
            qkv_bias_without_key(f"{layer}.self_attention.linear_qkv.bias", f"{block}.self_attn.q_proj.bias",
                                 f"{block}.self_attn.v_proj.bias", heads, head_dim),
        ]
        for t in ("weight", "bias"):
            rules += [
                same(f"{layer}.input_layernorm.{t}", f"{block}.self_attn_layer_norm.{t}"),
                same(f"{layer}.self_attention.linear_proj.{t}", f"{block}.self_attn.out_proj.{t}"),
                same(f"{layer}.pre_mlp_layernorm.{t}", f"{block}.final_layer_norm.{t}"),
                same(f"{layer}.mlp.linear_fc1.{t}", f"{block}.fc1.{t}"),
                same(f"{layer}.mlp.linear_fc2.{t}", f"{block}.fc2.{t}"),
            ]
    rules += [same(o(f"final_layernorm.{t}"), h(f"layer_norm.{t}")) for t in ("weight", "bias")]
    return rules


def audio_projector_hf_rules(audio: AudioEncoderConfig, ours: str = "encoders.audio.projector",
                             hf: str = "multi_modal_projector") -> list[Rule]:
    """Our projector from Qwen2-Audio's `multi_modal_projector.linear` (affine); the MLP projector
    maps to `linear_1` / `linear_2`, the names LLaVA gives its two-layer projector."""
    o, h = (lambda name: _joined(ours, name)), (lambda name: _joined(hf, name))
    if audio.projector_type == "affine":
        return [same(o(f"encoder.{t}"), h(f"linear.{t}")) for t in ("weight", "bias")]
    return [same(o(f"encoder.linear_fc{n}.{t}"), h(f"linear_{n}.{t}")) for n in (1, 2) for t in ("weight", "bias")]


def audio_config_from_hf(hf_audio: dict, problems: list[str], pooling_stride: int = 2,
                         projector_type: str = "affine") -> AudioEncoderConfig:
    """Our encoder from a transformers WhisperConfig / Qwen2AudioEncoderConfig dict; problems
    collects what cannot be represented."""
    if hf_audio.get("activation_function", "gelu") != "gelu":
        problems.append(f"audio activation_function={hf_audio['activation_function']!r} (only 'gelu')")
    if hf_audio.get("scale_embedding", False):
        problems.append("audio scale_embedding=True")
    return AudioEncoderConfig(
        num_mel_bins=hf_audio.get("num_mel_bins", 80),
        hidden_size=hf_audio["d_model"],
        num_layers=hf_audio["encoder_layers"],
        num_attention_heads=hf_audio["encoder_attention_heads"],
        ffn_hidden_size=hf_audio["encoder_ffn_dim"],
        max_source_positions=hf_audio.get("max_source_positions", 1500),
        pooling_stride=pooling_stride,
        projector_type=projector_type,
    )


def audio_config_to_hf(audio: AudioEncoderConfig) -> dict:
    """The transformers Qwen2AudioEncoderConfig fields of our encoder."""
    return {
        "model_type": "qwen2_audio_encoder",
        "num_mel_bins": audio.num_mel_bins,
        "d_model": audio.hidden_size,
        "encoder_layers": audio.num_layers,
        "encoder_attention_heads": audio.num_attention_heads,
        "encoder_ffn_dim": audio.ffn_hidden_size,
        "max_source_positions": audio.max_source_positions,
        "activation_function": "gelu",
        "scale_embedding": False,
    }
