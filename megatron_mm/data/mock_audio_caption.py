"""Audio-caption training samples generated on the fly from the synthetic tone sequences of
data/synthetic_mm.py (the data.mock of audio-language families): no files, a caption that names the
clip's pitches in order ("low high mid")."""

from __future__ import annotations

from megatron_mm.config import Config
from megatron_mm.data.mock_image_caption import FIRST_WORD, caption_sample, check_caption_ids


def caption_vocabulary() -> dict[str, int]:
    """Caption word -> token id (ids FIRST_WORD...; 0-2 are eod, bos, prompt)."""
    from megatron_mm.data import synthetic_mm

    return {word: FIRST_WORD + i for i, word in enumerate(sorted(synthetic_mm.PITCHES))}


def build_mock_audio_caption_datasets(cfg: Config, num_samples: tuple[int, int, int]):
    from megatron_mm.config import ConfigError

    if cfg.data.seq_length > cfg.model.max_position_embeddings:
        raise ConfigError(f"data.seq_length={cfg.data.seq_length} exceeds model.max_position_embeddings="
                          f"{cfg.model.max_position_embeddings}")
    return tuple(MockAudioCaptionDataset(cfg, n, split) if n else None for split, n in enumerate(num_samples))


class MockAudioCaptionDataset:
    """Sample i: [bos, <audio> x placeholders, prompt, pitch words..., eod, pad...] of
    data.seq_length tokens, with the clip (2-4 tones) as the family's processor prepares it. Loss
    only on the caption and eod."""

    def __init__(self, cfg: Config, num_samples: int, split: int):
        self.num_samples, self.seed = num_samples, cfg.train.seed * 10 + split
        self.seq_length = cfg.data.seq_length
        self.model = cfg.model
        self.processor = cfg.model.media_processors()["audio"]
        self.audio_token = cfg.model.placeholder_ids()["audio"]
        self.word_ids = caption_vocabulary()
        check_caption_ids(cfg, "audio", self.word_ids)

    def __len__(self) -> int:
        return self.num_samples

    def attributes(self, index: int) -> dict:
        import random

        from megatron_mm.data import synthetic_mm

        return synthetic_mm.random_audio_attributes(random.Random(self.seed * 1_000_003 + index))

    def __getitem__(self, index: int) -> dict:
        import numpy

        from megatron_mm.data import synthetic_mm

        attributes = self.attributes(index)
        waveform = synthetic_mm.render_tones(attributes).astype(numpy.float32) / 32768
        media, num_placeholders = self.processor(waveform)
        caption = [self.word_ids[w] for w in synthetic_mm.audio_caption(attributes).split()]
        return caption_sample(self.model, self.seq_length, self.audio_token, num_placeholders, media, caption)
