"""What every decoder-only family shares: the config fields, the megatron-core TransformerConfig
they map to, and the GPTModel construction. A family file subclasses DecoderConfig and overrides
only what makes the family itself."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from megatron_mm import megatron_settings
from megatron_mm.models.layers.counts import ModelCounts, decoder_counts

# Every tensor-parallel size up to 8 (a power of two) divides a padded vocabulary, so a checkpoint
# reshards across them.
VOCAB_TP_MULTIPLE = 8


@dataclass
class DecoderConfig:
    family: str
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA groups; None = multi-head attention
    head_dim: Optional[int] = None  # None = hidden_size / num_attention_heads
    vocab_size: Optional[int] = None  # None = the tokenizer's vocabulary
    # Embedding and output rows are padded to a multiple of lcm(this, VOCAB_TP_MULTIPLE), independent
    # of TP so that every layout builds the same shapes (a TP that does not divide it needs this to be
    # a multiple of that TP). Padded rows are masked out of the logits and trimmed on export.
    vocab_pad_multiple: int = 128
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    backend: str = "auto"  # auto | te | local: where the layer modules come from (models/layers/backend.py)
    megatron: dict[str, Any] = field(default_factory=dict)  # TransformerConfig fields (megatron_settings.py)

    # ---- what a family overrides -------------------------------------------------------------
    def family_transformer_fields(self) -> dict:
        """TransformerConfig fields that make this family (norm, activation, QK-norm, windows)."""
        return {}

    def family_model_kwargs(self) -> dict:
        """GPTModel keyword arguments that make this family (rotary scaling, ...)."""
        return {}

    def transformer_config_class(self):
        from megatron.core.transformer.transformer_config import TransformerConfig

        return TransformerConfig

    def extra_model_kwargs(self, transformer_config, layer_spec, backend, vp_stage) -> dict:
        """GPTModel arguments that depend on the built config (e.g. the multi-token-prediction block)."""
        return {}

    def layer_spec(self, transformer_config, backend, vp_stage=None):
        """The megatron-core ModuleSpec of one decoder layer (or the block's layer specs)."""
        return backend.gpt_layer_spec(transformer_config.qk_layernorm, transformer_config.normalization)

    def validate(self, parallel) -> list[str]:
        """Family-specific layout problems, one message each."""
        return []

    # ---- shared -----------------------------------------------------------------------------
    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self) -> int:
        if self.vocab_size is None:
            raise ValueError("model.vocab_size is unset and no tokenizer supplied one")
        multiple = math.lcm(self.vocab_pad_multiple, VOCAB_TP_MULTIPLE)
        return -(-self.vocab_size // multiple) * multiple

    def transformer_config(self, parallel, train, backend, batch_p2p_comm: bool):
        """The megatron-core TransformerConfig for this model under a parallel layout."""
        precision = train.precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() else "fp32"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        recompute = {}
        if train.recompute == "full":
            recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        elif train.recompute == "selective":
            recompute = dict(recompute_granularity="selective")
        fields = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.query_groups,
            kv_channels=self.kv_channels,
            layernorm_epsilon=self.norm_epsilon,
            init_method_std=self.init_method_std,
            hidden_dropout=self.hidden_dropout,
            attention_dropout=self.attention_dropout,
            # Llama-style defaults; families override in family_transformer_fields().
            normalization="RMSNorm",
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            # parallel layout
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            virtual_pipeline_model_parallel_size=parallel.vpp,
            num_layers_in_first_pipeline_stage=parallel.first_stage_layers,
            num_layers_in_last_pipeline_stage=parallel.last_stage_layers,
            context_parallel_size=parallel.cp,
            expert_model_parallel_size=parallel.ep,
            sequence_parallel=parallel.sequence_parallel,
            batch_p2p_comm=batch_p2p_comm,
            # precision
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            # Per-token loss: every layout and micro-batch split averages over the same tokens.
            calculate_per_token_loss=True,
            **recompute,
        )
        family = self.family_transformer_fields()
        kernels = backend.transformer_fields(moe=bool(family.get("num_moe_experts")))
        fields.update(kernels)
        fields.update(family)
        # model.megatron may override the backend's kernel choices, nothing else set here
        return megatron_settings.transformer_config(self.transformer_config_class(), fields, self.megatron,
                                                    self.family, overridable=kernels.keys() - family.keys())

    def build(self, transformer_config, backend, pre_process: bool, post_process: bool, vp_stage=None):
        """One model chunk (a pipeline stage, or a virtual stage of one)."""
        from megatron.core.models.gpt import GPTModel

        kwargs = dict(
            position_embedding_type="rope",
            rotary_base=int(self.rotary_base),
            share_embeddings_and_output_weights=self.tie_word_embeddings,
        )
        kwargs.update(self.family_model_kwargs())
        spec = self.layer_spec(transformer_config, backend, vp_stage)
        kwargs.update(self.extra_model_kwargs(transformer_config, spec, backend, vp_stage))
        model = GPTModel(
            config=transformer_config,
            transformer_layer_spec=spec,
            vocab_size=self.padded_vocab_size(),
            max_sequence_length=self.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            vp_stage=vp_stage,
            **kwargs,
        )
        if post_process and self.padded_vocab_size() > self.vocab_size:
            model.output_layer.register_forward_hook(PaddedVocabularyMask(self.vocab_size, self.padded_vocab_size()))
        return model

    def counts(self) -> ModelCounts:
        """Parameter counts and FLOPs per token of the unsharded model (models/layers/counts.py)."""
        return decoder_counts(self)

    def num_parameters(self) -> tuple[int, int]:
        """(total, embedding) parameter counts of the unsharded model."""
        counts = self.counts()
        return counts.total, counts.embedding


class PaddedVocabularyMask:
    """Forward hook of the output layer: the logits of padded vocabulary rows become -inf, so they take
    no share of the softmax in the loss (megatron-core's vocab-parallel cross entropy) or in the
    returned logits, and their rows get no gradient."""

    def __init__(self, vocab_size: int, padded_vocab_size: int):
        self.vocab_size, self.padded_vocab_size = vocab_size, padded_vocab_size

    def __call__(self, module, args, output):
        from megatron.core import parallel_state

        logits, bias = output
        width = logits.shape[-1]  # this rank's vocabulary partition, or all of it when gathered
        first = 0 if width == self.padded_vocab_size else parallel_state.get_tensor_model_parallel_rank() * width
        if first + width <= self.vocab_size:
            return None
        padded = torch.arange(first, first + width, device=logits.device) >= self.vocab_size
        return logits.masked_fill(padded, float("-inf")), bias
