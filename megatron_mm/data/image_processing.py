"""Images for fixed-resolution ViTs (models/vision.py): one square `image_size` picture per image,
normalised with the statistics the encoder was trained with.

CLIP: the shorter side is resized to `image_size` (bicubic, aspect kept) and the centre cropped
square. SigLIP: the whole image is resized to the square. Then [0, 255] -> [0, 1] and per-channel
(x - mean) / std.
"""

from __future__ import annotations

import numpy
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
STATISTICS = {"clip": (CLIP_MEAN, CLIP_STD), "siglip": (SIGLIP_MEAN, SIGLIP_STD)}


class FixedSizeImageProcessor:
    """uint8 HxWx3 (or HxW / HxWx4, made RGB) -> ({"images": [1, 3, size, size]}, num_placeholders)."""

    modality = "image"

    def __init__(self, image_size: int, encoder_type: str = "clip", num_placeholders: int = 0):
        if encoder_type not in STATISTICS:
            raise ValueError(f"no image statistics for encoder type {encoder_type!r}")
        self.image_size, self.encoder_type, self.num_placeholders = image_size, encoder_type, num_placeholders
        mean, std = STATISTICS[encoder_type]
        self.mean = numpy.array(mean, dtype=numpy.float32)
        self.std = numpy.array(std, dtype=numpy.float32)

    def resized(self, image: numpy.ndarray) -> numpy.ndarray:
        from PIL import Image

        picture = Image.fromarray(image)
        if picture.mode != "RGB":
            picture = picture.convert("RGB")
        size = self.image_size
        if self.encoder_type == "siglip":
            return numpy.asarray(picture.resize((size, size), Image.BICUBIC))
        width, height = picture.size
        short, long = min(width, height), max(width, height)
        long = int(size * long / short)  # truncated, as the reference processors do
        new_width, new_height = (size, long) if width <= height else (long, size)
        resized = numpy.asarray(picture.resize((new_width, new_height), Image.BICUBIC))
        top, left = (new_height - size) // 2, (new_width - size) // 2
        return resized[top:top + size, left:left + size]

    def __call__(self, item) -> tuple[dict, int]:
        image = numpy.asarray(item)
        if image.dtype != numpy.uint8:
            raise ValueError(f"images are uint8 HxWx3 arrays, got {image.dtype}")
        pixels = self.resized(image).astype(numpy.float32) / 255.0
        pixels = (pixels - self.mean) / self.std
        return {"images": torch.from_numpy(pixels).permute(2, 0, 1).contiguous().unsqueeze(0)}, self.num_placeholders
