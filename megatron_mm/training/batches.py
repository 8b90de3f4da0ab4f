"""Datasets and per-rank micro-batch iterators for the pretraining loop.

Global batch i holds samples [i*gbs, (i+1)*gbs) of the training set, whatever the layout: each
data-parallel rank takes its slice of each run of micro_batch_size*dp samples (Megatron-LM's
pretraining sampler), and tensor/pipeline ranks of one replica read the same samples. So the loss of
a global batch, and the data position after a resume, depend only on the number of consumed samples.
"""

from __future__ import annotations

import torch

from megatron_mm.config import Config
from megatron_mm.data.epochs import ReshuffledEpochs, epoch_request

# Stacked per sample; every other key of a sample is media (images, patches, audio features) with a
# leading item dimension, concatenated over the micro-batch (models/multimodal.py reads them).
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def build_datasets(cfg: Config, tokenizer, num_samples: tuple[int, int, int]):
    """(train, valid, test) datasets; valid/test may be None."""
    from megatron_mm.data.gpt_data import build_gpt_datasets, parse_blend
    from megatron_mm.models.multimodal import MultimodalFamily

    if isinstance(cfg.model, MultimodalFamily):
        return _multimodal_datasets(cfg, tokenizer, num_samples)  # their order is prefix-stable already
    train_request = None
    if not cfg.data.mock:
        train_request = epoch_request(*parse_blend(cfg.data.blend), cfg.data.split, cfg.data.seq_length)
    train, valid, test = build_gpt_datasets(
        blend=cfg.data.blend,
        split=cfg.data.split,
        seq_length=cfg.data.seq_length,
        seed=cfg.train.seed,
        num_samples=(train_request, *num_samples[1:]),
        tokenizer=tokenizer,
        cache_dir=cfg.data.cache_dir,
        mock=cfg.data.mock,
        vocab_size=cfg.model.vocab_size,
    )
    if train is not None:  # a longer run sees the same samples up to the shorter one's end
        train = ReshuffledEpochs(train, cfg.train.seed, num_samples[0])
    return train, valid, test


def _multimodal_datasets(cfg: Config, tokenizer, num_samples: tuple[int, int, int]):
    """Generated captions (data.mock: tones for audio families, shapes otherwise), or packed
    samples of mm_indexed prefixes (data.blend)."""
    if cfg.data.mock:
        if "audio" in cfg.model.placeholder_ids():
            from megatron_mm.data.mock_audio_caption import build_mock_audio_caption_datasets

            return build_mock_audio_caption_datasets(cfg, num_samples)
        from megatron_mm.data.mock_image_caption import build_mock_image_caption_datasets

        return build_mock_image_caption_datasets(cfg, num_samples)
    from megatron_mm.data.mm_training import build_mm_datasets, format_packing_stats

    datasets = build_mm_datasets(cfg, cfg.model.media_processors(), num_samples, cfg.model.position_ids,
                                 pad_token_id=tokenizer.pad, families_taking=_families_taking)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        for name, dataset in zip(("train", "valid", "test"), datasets):
            if dataset is not None:
                print(format_packing_stats(name, dataset.stats), flush=True)
    return datasets


def _families_taking(modality: str) -> list[str]:
    """The registered multimodal families with an encoder for `modality`."""
    from megatron_mm.models.multimodal import MultimodalFamily
    from megatron_mm.models.registry import FAMILIES, family_config_class

    return [name for name in FAMILIES if issubclass(config_class := family_config_class(name), MultimodalFamily)
            and modality in config_class().placeholder_ids()]


class MicroBatches:
    """Endless iterator over this data-parallel rank's micro-batches, from a sample offset on."""

    def __init__(self, dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int):
        self.dataset = dataset
        self.next_sample = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = self.next_sample + self.dp_rank * self.micro_batch_size
        samples = [self.dataset[(start + i) % len(self.dataset)] for i in range(self.micro_batch_size)]
        self.next_sample += self.micro_batch_size * self.dp_size
        batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in BATCH_KEYS}
        for key in samples[0].keys() - batch.keys():
            batch[key] = torch.cat([torch.as_tensor(s[key]) for s in samples])
        return batch
