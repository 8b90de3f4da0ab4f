"""GPT train/valid/test datasets from preprocessed indexed datasets, on megatron-core's dataset builder.

Samples are megatron-core GPTDataset items: dicts of `tokens`, `labels` (tokens shifted by one),
`loss_mask`, `position_ids` (and `attention_mask` when asked for), each `seq_length` long.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_mm.data.indexed_format import check_indexed_dataset, max_token_id
from megatron_mm.data.tokenizer import Tokenizer
from megatron_mm.data.vocab_check import cached_max_token_id, check_vocabulary, rank_zero_first
from megatron_mm.errors import UserError

# Mock tokens when there is no tokenizer: ids below 256 fit every model's vocabulary.
DEFAULT_MOCK_VOCAB_SIZE = 256


class DatasetTokenizer:
    """The part of a tokenizer GPTDatasetConfig reads: vocab_size, eod/eos, pad, unique_identifiers.

    megatron-core hashes `unique_identifiers` into its index-cache names and masks `pad` in labels;
    a pad equal to eod is left undefined so that megatron-core falls back to its own pad id instead
    of warning about the collision and masking every EOS.
    """

    def __init__(self, vocab_size: int, eod: int, pad: Optional[int] = None):
        self.vocab_size = vocab_size
        self.eod = eod
        self.eos = eod
        if pad is not None and pad != eod:
            self.pad = pad
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": vocab_size, "eod": eod, "pad": pad}

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer) -> "DatasetTokenizer":
        return cls(tokenizer.vocab_size, tokenizer.eod, tokenizer.pad)


class _DatasetBuilder(BlendedMegatronDatasetBuilder):
    """megatron-core's builder, usable with a cache directory when torch.distributed is not initialized."""

    @staticmethod
    def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
        if cls is BlendedDataset and not torch.distributed.is_initialized():
            # BlendedDataset asks torch.distributed for the rank whenever it has a cache path; its
            # indices are cheap, so outside torch.distributed they are rebuilt instead of cached.
            *dataset_args, config = args
            config = copy.copy(config)
            config.path_to_cache = None
            args = (*dataset_args, config)
        return BlendedMegatronDatasetBuilder.build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args)


def parse_blend(blend: Sequence[Union[str, float]]) -> tuple[list[str], Optional[list[float]]]:
    """Megatron-LM's --data-path form: `[prefix, ...]` or `[weight, prefix, weight, prefix, ...]`.

    Weights may be numbers or numeric strings and need not sum to one. Returns (prefixes, weights or None).
    """
    items = [str(item).strip() for item in blend]
    if not items:
        raise UserError("the data blend is empty")
    weights = [_as_weight(item) for item in items[0::2]]
    if len(items) % 2 == 0 and all(weight is not None for weight in weights):
        if any(weight <= 0 for weight in weights):
            raise UserError(f"blend weights must be positive: {weights}")
        return items[1::2], weights
    if any(_as_weight(item) is not None for item in items):
        raise UserError(f"blend must be [prefix, ...] or [weight, prefix, weight, prefix, ...], got {items}")
    return items, None


def check_text_datasets(prefixes: Sequence[str], vocab_size: int) -> None:
    """Each dataset complete (its .bin as long as its .idx says), not empty, and every id < vocab_size."""
    for prefix in prefixes:
        summary = check_indexed_dataset(prefix)
        largest = cached_max_token_id(prefix, lambda: max_token_id(prefix, summary))
        check_vocabulary(prefix, largest, vocab_size)


def _as_weight(item: str) -> Optional[float]:
    try:
        return float(item)
    except ValueError:
        return None


def build_gpt_datasets(
    blend: Optional[Sequence[Union[str, float]]],
    split: str,
    seq_length: int,
    seed: int,
    num_samples: Sequence[int],
    tokenizer: Optional[Tokenizer],
    cache_dir: Optional[str] = None,
    *,
    mock: bool = False,
    vocab_size: Optional[int] = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = False,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
    builder_threads: int = 1,
) -> tuple[Optional[Dataset], Optional[Dataset], Optional[Dataset]]:
    """(train, valid, test) GPT datasets; a split with zero weight in `split` (e.g. "98,2,0") is None.

    blend: see `parse_blend`, e.g. ["0.7", "a_text_document", "0.3", "b_text_document"]; weighted
        blends draw samples in proportion to the weights, unweighted ones in proportion to size.
    split: train,valid,test proportions of each dataset's documents, e.g. "98,1,1".
    num_samples: (train, valid, test) samples wanted; datasets are repeated for more epochs if needed.
    cache_dir: where megatron-core caches its sample indices (default: a `cache/` directory inside
        a folder named after each data prefix).
    mock: synthetic tokens and no data files (blend and split are ignored); without a tokenizer the
        mock ids are below `vocab_size` (default 256).
    vocab_size: the model's vocabulary (default: the tokenizer's); real data holding a larger id is
        refused, as is a truncated or empty dataset (`check_text_datasets`).
    is_built_on_rank: with torch.distributed initialized, ranks where it returns False build nothing
        and get None (e.g. only tensor-parallel rank 0 reads data); it must be True on global rank 0.
        Default: every rank builds, rank 0 first, then the others load its cached indices. With
        torch.distributed initialized, every rank must call this function (it holds barriers).
    """
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must be (train, valid, test), got {num_samples}")
    if tokenizer is not None:
        dataset_tokenizer = DatasetTokenizer.from_tokenizer(tokenizer)
    elif mock:
        dataset_tokenizer = DatasetTokenizer(vocab_size or DEFAULT_MOCK_VOCAB_SIZE, eod=0)
    else:
        raise UserError("a tokenizer is needed for real data (its EOS id marks document ends)")

    parsed_blend = None
    if not mock:
        if not blend:
            raise UserError("no data: give a blend of indexed-dataset prefixes or use mock data")
        parsed_blend = parse_blend(blend)
        for prefix in parsed_blend[0]:
            if not IndexedDataset.exists(prefix):
                raise UserError(f"indexed dataset not found: {prefix} (needs {prefix}.bin and {prefix}.idx)")
        rank_zero_first(lambda: check_text_datasets(parsed_blend[0], vocab_size or dataset_tokenizer.vocab_size))

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=parsed_blend,
        split=None if mock else split,
        path_to_cache=cache_dir,
        tokenizer=dataset_tokenizer,
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
        num_dataset_builder_threads=builder_threads,
    )
    builder = _DatasetBuilder(
        MockGPTDataset if mock else GPTDataset,
        list(num_samples),
        is_built_on_rank or (lambda: True),
        config,
    )
    train, valid, test = builder.build()
    return train, valid, test
