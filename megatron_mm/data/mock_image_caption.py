"""Image-caption training samples generated on the fly from the synthetic shapes of
data/synthetic_mm.py (the data.mock of image-language families): no files, a caption that is a
function of the image."""

from __future__ import annotations

import torch

from megatron_mm.config import Config

BOS, PROMPT, EOD, FIRST_WORD = 1, 2, 0, 3
# The drawings are rescaled to one of these (width, height) per sample, so native-resolution
# encoders see images of several sizes (fixed-size ones resize them back).
IMAGE_SIZES = ((64, 64), (96, 64), (64, 96), (48, 48))


def caption_vocabulary() -> dict[str, int]:
    """Caption word -> token id (ids FIRST_WORD...; 0-2 are eod, bos, prompt)."""
    from megatron_mm.data import synthetic_mm

    words = [*synthetic_mm.COUNT_WORDS.values(), *synthetic_mm.COLOURS, *synthetic_mm.SHAPES,
             *(f"{s}s" for s in synthetic_mm.SHAPES), *(p for _, p in synthetic_mm.POSITIONS.values())]
    words = sorted({w for phrase in words for w in phrase.split()})
    return {w: FIRST_WORD + i for i, w in enumerate(words)}


def check_caption_ids(cfg: Config, modality: str, word_ids: dict[str, int]) -> None:
    """The placeholder id must not be a caption id, and every caption id must be in the vocabulary."""
    used = {EOD, BOS, PROMPT, *word_ids.values()}
    token = cfg.model.placeholder_ids()[modality]
    if token in used:
        raise ValueError(f"model.{modality}_token_id={token} collides with the caption ids 0-{max(used)}")
    if max(used) >= cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} < {max(used) + 1} caption ids")


def caption_sample(model, seq_length: int, placeholder_id: int, num_placeholders: int, media: dict,
                   caption: list[int]) -> dict:
    """[bos, placeholder x num_placeholders, prompt, caption..., eod, pad...] of seq_length tokens with
    its media; loss only on the caption and eod."""
    text = [BOS, *[placeholder_id] * num_placeholders, PROMPT, *caption, EOD]
    if len(text) > seq_length:
        raise ValueError(f"media and caption take {len(text)} tokens; data.seq_length={seq_length}")
    tokens = torch.full((seq_length,), EOD, dtype=torch.long)
    tokens[: len(text)] = torch.tensor(text)
    labels = torch.cat([tokens[1:], tokens.new_full((1,), EOD)])
    loss_mask = torch.zeros(seq_length)
    loss_mask[1 + num_placeholders : len(text) - 1] = 1.0  # from the prompt (predicts the first word) on
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
            "position_ids": model.position_ids(tokens, media), **media}


def build_mock_image_caption_datasets(cfg: Config, num_samples: tuple[int, int, int]):
    from megatron_mm.config import ConfigError

    if not cfg.data.mock:
        raise ConfigError(f"model.family={cfg.model.family} trains on generated image-caption samples here: "
                          "set data.mock=true")
    if cfg.data.seq_length > cfg.model.max_position_embeddings:
        raise ConfigError(f"data.seq_length={cfg.data.seq_length} exceeds model.max_position_embeddings="
                          f"{cfg.model.max_position_embeddings}")
    return tuple(MockImageCaptionDataset(cfg, n, split) if n else None for split, n in enumerate(num_samples))


class MockImageCaptionDataset:
    """Sample i: [bos, <image> x placeholders, prompt, caption words..., eod, pad...] of
    data.seq_length tokens, with the image (at one of IMAGE_SIZES) as the family's processor
    prepares it. Loss only on the caption and eod. `zero_images` blanks every image (a control: no
    visual information)."""

    def __init__(self, cfg: Config, num_samples: int, split: int, zero_images: bool = False):
        self.num_samples, self.seed = num_samples, cfg.train.seed * 10 + split
        self.seq_length, self.zero_images = cfg.data.seq_length, zero_images
        self.model = cfg.model
        self.processor = cfg.model.media_processors()["image"]
        self.image_token = cfg.model.placeholder_ids()["image"]
        self.word_ids = caption_vocabulary()
        check_caption_ids(cfg, "image", self.word_ids)

    def __len__(self) -> int:
        return self.num_samples

    def attributes(self, index: int) -> tuple[dict, "random.Random"]:
        import random

        from megatron_mm.data import synthetic_mm

        rng = random.Random(self.seed * 1_000_003 + index)
        return synthetic_mm.random_image_attributes(rng), rng

    def __getitem__(self, index: int) -> dict:
        import numpy

        from megatron_mm.data import synthetic_mm

        from PIL import Image

        attributes, rng = self.attributes(index)
        drawing = synthetic_mm.render_image(attributes, rng).convert("RGB")
        image = numpy.asarray(drawing.resize(rng.choice(IMAGE_SIZES), Image.NEAREST))
        if self.zero_images:
            image = numpy.zeros_like(image)
        media, num_placeholders = self.processor(image)
        caption = [self.word_ids[w] for w in synthetic_mm.image_caption(attributes).split()]
        return caption_sample(self.model, self.seq_length, self.image_token, num_placeholders, media, caption)
