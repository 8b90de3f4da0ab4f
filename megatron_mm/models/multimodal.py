"""Encoders + projectors + a language model: the one multimodal model class every multimodal family
builds (llava.py, qwen2_vl.py, qwen2_audio.py).

The language model is the family's own megatron-core GPTModel (any decoder family: dense or MoE,
rope or M-RoPE). Placeholders are expanded in the text: a sample holds one placeholder token per
embedding its image/audio contributes, so the sequence the decoder sees is the token sequence and
labels, loss masks and pipeline shapes stay those of text. On the first pipeline stage each
modality's encoder (encoder and projector together) turns the micro-batch's media into rows that
overwrite the placeholder tokens' word embeddings, in (sample, position) order.

An encoder module declares `MEDIA_KEYS` (the batch keys it reads) and maps
`forward(**media) -> Tensor[num_placeholders, language_hidden_size]`.
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from megatron_mm.models.layers.counts import EncoderCounts, ModelCounts


class MultimodalModel(MegatronModule):
    def __init__(self, config, language_model, encoders: dict[str, torch.nn.Module], placeholder_ids: dict[str, int]):
        super().__init__(config=config)
        self.language_model = language_model
        self.encoders = torch.nn.ModuleDict(encoders)  # empty off the first pipeline stage
        self.placeholder_ids = dict(placeholder_ids)
        self.pre_process, self.post_process = language_model.pre_process, language_model.post_process
        self.share_embeddings_and_output_weights = language_model.share_embeddings_and_output_weights
        self.model_type = language_model.model_type
        if self.pre_process:
            # Media rows go in before the sequence-parallel scatter, so the embedding must not
            # reduce-scatter itself; _embed all-reduces and scatters instead.
            language_model.embedding.word_embeddings.reduce_scatter_embeddings = False

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None) -> dict:
        # MegatronModule's default would reach the encoders through the plain ModuleDict and save
        # their tensor-parallel shards as if replicated; each encoder shards itself instead.
        from megatron.core.transformer.utils import sharded_state_dict_default

        state = self.language_model.sharded_state_dict(f"{prefix}language_model.", sharded_offsets, metadata)
        for name, encoder in self.encoders.items():
            state.update(sharded_state_dict_default(encoder, f"{prefix}encoders.{name}.", sharded_offsets, metadata))
        return state

    def forward(self, tokens, position_ids, attention_mask=None, labels=None, **media):
        """Per-token losses [B, S] with labels, else logits [B, S, V] (last stage); hidden states
        on other stages. position_ids are [B, S], or [3, B, S] for M-RoPE."""
        decoder_input = self._embed(tokens, media) if self.pre_process else None
        return self.language_model(tokens, position_ids, attention_mask, decoder_input=decoder_input, labels=labels)

    def _embed(self, tokens, media: dict) -> torch.Tensor:
        words = self.language_model.embedding.word_embeddings(tokens)  # [B, S, H]
        for modality, encoder in self.encoders.items():
            placeholders = tokens == self.placeholder_ids[modality]
            inputs = {key: media[key] for key in encoder.MEDIA_KEYS if key in media}
            expected = int(placeholders.sum())
            if not inputs:
                if expected:
                    raise ValueError(f"{expected} {modality} placeholder tokens but no {modality} inputs in the batch")
                continue
            inputs = {k: v.to(self.config.params_dtype) if v.is_floating_point() else v for k, v in inputs.items()}
            rows = encoder(**inputs)
            if rows.shape[0] != expected:
                raise ValueError(f"the {modality} encoder gave {rows.shape[0]} embeddings for {expected} "
                                 f"placeholder tokens (id {self.placeholder_ids[modality]})")
            words = words.masked_scatter(placeholders.unsqueeze(-1), rows.to(words.dtype))
        embeddings = words.transpose(0, 1).contiguous()  # [S, B, H]
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings)
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.language_model.embedding.embedding_dropout(embeddings)
        return self.language_model.embedding.embedding_dropout(embeddings)


class MultimodalFamily:
    """Mixin for a multimodal family's config, placed before its language model's config class:
    `class LlavaConfig(MultimodalFamily, LlamaConfig)`. The family supplies its encoders, their data
    processors and their placeholder token ids; the language model is built as the decoder family
    builds it."""

    def build_encoders(self, transformer_config, backend) -> dict[str, torch.nn.Module]:
        """modality -> encoder module; their configs start from encoders.common.encoder_config."""
        raise NotImplementedError

    def placeholder_ids(self) -> dict[str, int]:
        raise NotImplementedError

    def media_processors(self) -> dict:
        """modality -> processor: item (uint8 HxWx3 image / float32 16 kHz waveform) -> (media
        tensors with a leading item dimension, number of placeholder tokens)."""
        raise NotImplementedError

    def position_ids(self, tokens: torch.Tensor, media: dict) -> torch.Tensor:
        """One sample's position ids ([S]; M-RoPE families return [3, S])."""
        return torch.arange(tokens.shape[0])

    def encoder_counts(self) -> dict[str, EncoderCounts]:
        """modality -> its encoder's and projector's counts (models/layers/counts.py)."""
        raise NotImplementedError

    def validate(self, parallel) -> list[str]:
        problems = super().validate(parallel)
        for modality, token_id in self.placeholder_ids().items():
            if not 0 <= token_id < (self.vocab_size or token_id + 1):
                problems.append(f"model.{modality}_token_id={token_id} is outside the vocabulary "
                                f"(model.vocab_size={self.vocab_size})")
        if parallel.vpp is not None:
            problems.append(f"model.family={self.family} does not support parallel.vpp yet")
        return problems

    def build(self, transformer_config, backend, pre_process: bool, post_process: bool, vp_stage=None):
        language_model = super().build(transformer_config, backend, pre_process, post_process, vp_stage)
        encoders = self.build_encoders(transformer_config, backend) if pre_process else {}
        return MultimodalModel(transformer_config, language_model, encoders, self.placeholder_ids())

    def counts(self) -> ModelCounts:
        return dataclasses.replace(super().counts(), encoders=self.encoder_counts())
