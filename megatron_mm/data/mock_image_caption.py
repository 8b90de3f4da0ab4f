"""Image-caption training samples generated on the fly from the synthetic shapes of
data/synthetic_mm.py (the data.mock of multimodal families): no files, a caption that is a function
of the image."""

from __future__ import annotations

import torch

from megatron_mm.config import Config


def build_mock_image_caption_datasets(cfg: Config, num_samples: tuple[int, int, int]):
    """Image-caption samples generated on the fly (data.mock-style; no mm_indexed reading yet)."""
    from megatron_mm.config import ConfigError

    m, d = cfg.model, cfg.data
    if not d.mock:
        raise ConfigError(f"model.family={m.family} trains on generated image-caption samples only: set data.mock=true")
    if d.seq_length > m.max_position_embeddings or (cfg.parallel.pp > 1 and d.seq_length != m.max_position_embeddings):
        raise ConfigError(f"data.seq_length={d.seq_length} (text + image embeddings) must be <= model.max_position_"
                          f"embeddings={m.max_position_embeddings}, and equal with parallel.pp > 1")
    return tuple(MockImageCaptionDataset(cfg, n, split) if n else None for split, n in enumerate(num_samples))


class MockImageCaptionDataset:
    """Shape images of data/synthetic_mm.py with their captions as word ids: sample i is
    [bos, <image>, prompt, caption words..., eod, pad...], text length seq_length - image
    embeddings + 1, so text plus image embeddings fill exactly data.seq_length. Loss only on the
    caption and eod; the caption is a function of the image."""

    BOS, PROMPT, EOD, FIRST_WORD = 1, 2, 0, 3

    def __init__(self, cfg: Config, num_samples: int, split: int):
        from megatron_mm.data import synthetic_mm

        self.num_samples, self.seed = num_samples, cfg.train.seed * 10 + split
        self.image_size, self.image_token = cfg.model.vision_image_size, cfg.model.image_token_id
        self.text_length = cfg.data.seq_length - cfg.model.num_image_embeddings + 1
        words = [*synthetic_mm.COUNT_WORDS.values(), *synthetic_mm.COLOURS, *synthetic_mm.SHAPES,
                 *(f"{s}s" for s in synthetic_mm.SHAPES), *(p for _, p in synthetic_mm.POSITIONS.values())]
        words = sorted({w for phrase in words for w in phrase.split()})
        self.word_ids = {w: self.FIRST_WORD + i for i, w in enumerate(words)}
        if self.FIRST_WORD + len(words) > cfg.model.vocab_size:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} < {self.FIRST_WORD + len(words)} caption ids")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        import random

        import numpy
        from PIL import Image

        from megatron_mm.data import synthetic_mm

        rng = random.Random(self.seed * 1_000_003 + index)
        attributes = synthetic_mm.random_image_attributes(rng)
        image = synthetic_mm.render_image(attributes, rng).convert("RGB")
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.NEAREST)
        pixels = torch.from_numpy(numpy.asarray(image, dtype=numpy.float32)).permute(2, 0, 1) / 127.5 - 1.0
        caption = [self.word_ids[w] for w in synthetic_mm.image_caption(attributes).split()]
        text = [self.BOS, self.image_token, self.PROMPT, *caption, self.EOD]
        if len(text) > self.text_length:
            raise ValueError(f"caption of {len(text)} tokens does not fit {self.text_length} text positions")
        tokens = torch.full((self.text_length,), self.EOD, dtype=torch.long)
        tokens[: len(text)] = torch.tensor(text)
        labels = torch.cat([tokens[1:], tokens[:1].new_full((1,), self.EOD)])
        labels[labels == self.image_token] = 0
        loss_mask = torch.zeros(self.text_length)
        loss_mask[2 : len(text) - 1] = 1.0  # from the prompt (predicts the first word) to the last word (eod)
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
                "position_ids": torch.arange(self.text_length), "images": pixels}
