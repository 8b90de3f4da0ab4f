"""Qwen2-VL-style media processing: images and videos at their native resolution (within a pixel
budget) cut into the patch rows models/qwen2_vl_vision.py reads, and the M-RoPE positions
(temporal, row, column) of a token sequence holding their placeholders."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def fit_to_grid(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (height, width) an image is resized to: both multiples of `factor`, the area within
    [min_pixels, max_pixels], the aspect ratio kept as well as those allow."""
    if max(height, width) > 200 * min(height, width):
        raise ValueError(f"image of {height}x{width} pixels: aspect ratio above 200")

    def snap(value: float, rounding) -> int:
        return int(rounding(value / factor)) * factor

    h, w = snap(height, round), snap(width, round)
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h, w = max(factor, snap(height / shrink, math.floor)), max(factor, snap(width / shrink, math.floor))
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h, w = snap(height * grow, math.ceil), snap(width * grow, math.ceil)
    return h, w


@dataclass
class Qwen2VLImageProcessor:
    """item -> ({"pixel_values": [patches, C * temporal_patch * patch^2], "image_grid_thw": [1, 3]},
    number of placeholder tokens). An item is a uint8 HxWx3 image, or a list of such frames (a video,
    every frame resized as the first). An image is repeated to fill one temporal patch; a video's
    last frame is repeated to fill its last one."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: Sequence[float] = CLIP_MEAN
    image_std: Sequence[float] = CLIP_STD

    modality = "image"

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return fit_to_grid(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)

    def num_placeholders(self, height: int, width: int, frames: int = 1) -> int:
        h, w = self.target_size(height, width)
        temporal = -(-frames // self.temporal_patch_size)
        return temporal * (h // self.patch_size) * (w // self.patch_size) // self.merge_size ** 2

    def __call__(self, item) -> tuple[dict[str, torch.Tensor], int]:
        from PIL import Image

        frames = [numpy.asarray(frame) for frame in (item if isinstance(item, (list, tuple)) else [item])]
        for frame in frames:
            if frame.dtype != numpy.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise ValueError(f"expected uint8 HxWx3 frames, got {frame.dtype} {frame.shape}")
        height, width = self.target_size(*frames[0].shape[:2])
        resized = numpy.stack([numpy.asarray(Image.fromarray(frame).resize((width, height), Image.BICUBIC))
                               for frame in frames])  # [T, H, W, C]
        mean, std = (numpy.asarray(v, dtype=numpy.float32) for v in (self.image_mean, self.image_std))
        pixels = (resized.astype(numpy.float32) / 255.0 - mean) / std
        pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # [T, C, H, W]
        short = -pixels.shape[0] % self.temporal_patch_size
        if short:
            pixels = torch.cat([pixels, pixels[-1:].expand(short, -1, -1, -1)])

        t, p, m = pixels.shape[0] // self.temporal_patch_size, self.patch_size, self.merge_size
        rows, cols = height // p, width // p
        # Patches in merge-window order: the m x m patches of one merged group are consecutive rows,
        # each row holding (channel, frame-in-temporal-patch, y, x).
        patches = pixels.reshape(t, self.temporal_patch_size, 3, rows // m, m, p, cols // m, m, p)
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * rows * cols, -1)
        grid = torch.tensor([[t, rows, cols]], dtype=torch.long)
        return {"pixel_values": patches.contiguous(), "image_grid_thw": grid}, t * rows * cols // m ** 2


def mrope_position_ids(tokens: torch.Tensor, image_grid_thws, image_token_id: int, merge_size: int = 2,
                       video_grid_thws=None, video_token_id: Optional[int] = None,
                       video_time_interval: float = 1.0) -> torch.Tensor:
    """[3, S] (temporal, row, column) positions of one sample's tokens [S].

    Text advances all three by one per token. An image's placeholders (t * h * w / merge^2 of them,
    the grids in order of appearance) take their merged grid's (t, row, column) offset by the next
    free position; the text after it continues from their largest position + 1. Video placeholders
    (their own token id) space frames `video_time_interval` apart (Qwen2.5-VL: tokens_per_second *
    seconds per temporal patch)."""
    kinds = {image_token_id: (iter(_as_grids(image_grid_thws)), 1.0)}
    if video_token_id is not None:
        kinds[video_token_id] = (iter(_as_grids(video_grid_thws)), video_time_interval)
    ids = tokens.tolist()
    positions = torch.empty(3, len(ids), dtype=torch.long)
    start, i = 0, 0
    while i < len(ids):
        if ids[i] not in kinds:
            end = i
            while end < len(ids) and ids[end] not in kinds:
                end += 1
            positions[:, i:end] = torch.arange(start, start + end - i)
            start, i = start + end - i, end
            continue
        grids, interval = kinds[ids[i]]
        grid = next(grids, None)
        if grid is None:
            raise ValueError(f"placeholder token {ids[i]} at position {i} has no grid left")
        t, h, w = grid[0], grid[1] // merge_size, grid[2] // merge_size
        count = t * h * w
        if ids[i:i + count] != [ids[i]] * count:
            raise ValueError(f"grid {tuple(grid)} needs {count} placeholder tokens {ids[i]} from position {i}")
        frames = (torch.arange(t) * interval).long()
        block = torch.stack(torch.meshgrid(frames, torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1)
        positions[:, i:i + count] = block + start
        start, i = int(positions[:, i:i + count].max()) + 1, i + count
    for token, (grids, _) in kinds.items():
        if next(grids, None) is not None:
            raise ValueError(f"more grids than placeholder runs of token {token}")
    return positions


def _as_grids(grid_thws) -> list[list[int]]:
    if grid_thws is None:
        return []
    return [list(map(int, grid)) for grid in (grid_thws.tolist() if torch.is_tensor(grid_thws) else grid_thws)]
