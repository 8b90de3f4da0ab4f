"""Gemma 3 text decoder (1B-27B), as far as megatron-core 0.16.1's layer allows.

Built here: GeGLU MLP (tanh-approximated GELU, gated), QK-norm, head_dim 256, tied embeddings,
five sliding-window (local) layers for every global layer (window_attn_skip_freq=6).

Not expressible with megatron-core 0.16.1's TransformerLayer / GPTModel, so this family does not yet
reproduce Gemma 3's published checkpoints exactly:
- the extra post-attention and post-feed-forward RMSNorms ("sandwich" norms);
- RMSNorm with (1 + weight) scaling (zero-centred gamma; megatron-core supports it only in TE/apex norms);
- embeddings scaled by sqrt(hidden_size);
- separate rotary bases for local (10k) and global (1M, linear scaling 8 for 4B+) layers: one base here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch.nn.functional as F

from megatron_mm.models.base import DecoderConfig


@dataclass
class Gemma3Config(DecoderConfig):
    family: str = "gemma3"
    head_dim: int = 256
    rotary_base: float = 1000000.0
    norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = True
    sliding_window: int = 1024  # tokens each local-layer query sees, itself included
    global_layer_every: int = 6  # every sixth layer attends globally

    def family_transformer_fields(self) -> dict:
        return {
            "qk_layernorm": True,
            "activation_func": functools.partial(F.gelu, approximate="tanh"),
            "window_size": (self.sliding_window - 1, 0),
            "window_attn_skip_freq": self.global_layer_every,
        }


CONFIG_CLASS = Gemma3Config
