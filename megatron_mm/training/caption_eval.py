"""Held-out accuracy of an image-language model on the generated shape captions
(data/mock_image_caption.py): does it name the colour and the shape of images it never saw?

For each held-out sample, teacher-forced, the model's logits at the position that predicts the colour
word (and the shape noun) are compared among the candidate words only: the four colours, and the
three shape nouns in the caption's number ("circle" or "circles"). Chance is 1/4 and 1/3.

    torchrun --nproc_per_node 1 -m megatron_mm.training.caption_eval --config C.yaml --checkpoint DIR \\
        [--samples 256] [--zero-images] [key=value ...]

prints one JSON line {"colour": accuracy, "shape": accuracy, "samples": n, "chance": {...}}.
"""

from __future__ import annotations

import argparse
import json

import torch

from megatron_mm.config import load_config
from megatron_mm.data import synthetic_mm
from megatron_mm.data.mock_image_caption import PROMPT, MockImageCaptionDataset, caption_vocabulary
from megatron_mm.runtime import LaunchEnv, destroy_distributed
from megatron_mm.training.batches import MicroBatches
from megatron_mm.training.setup import build_from_checkpoint, check_config, init_parallel
from megatron_mm.training.tasks.base import model_forward

VALID_SPLIT = 1  # the samples the training run's validation reads, never its training ones


@torch.no_grad()
def caption_accuracy(model, cfg, num_samples: int, zero_images: bool = False, batch_size: int = 8) -> dict:
    """Colour and shape accuracy of `model` (one unwrapped or wrapped chunk holding the whole model)."""
    dataset = MockImageCaptionDataset(cfg, num_samples, VALID_SPLIT, zero_images=zero_images)
    ids = caption_vocabulary()
    colours = torch.tensor([ids[c] for c in sorted(synthetic_mm.COLOURS)])
    nouns = {plural: torch.tensor([ids[s + ("s" if plural else "")] for s in synthetic_mm.SHAPES])
             for plural in (False, True)}
    correct = {"colour": 0, "shape": 0}
    batches = MicroBatches(dataset, 0, batch_size, 0, 1)
    model.eval()
    for start in range(0, num_samples, batch_size):
        batch = next(batches)
        logits = model_forward(model, batch, with_labels=False).float()
        for row in range(min(batch_size, num_samples - start)):
            attributes, _ = dataset.attributes(start + row)
            count_at = batch["tokens"][row].tolist().index(PROMPT) + 1  # the caption's first word
            colour = sorted(synthetic_mm.COLOURS).index(attributes["colour"])
            shape = synthetic_mm.SHAPES.index(attributes["shape"])
            # logits at position p predict token p + 1: colour after the count word, noun after the colour
            correct["colour"] += int(logits[row, count_at, colours].argmax()) == colour
            correct["shape"] += int(logits[row, count_at + 1, nouns[attributes["count"] > 1]].argmax()) == shape
    return {"colour": correct["colour"] / num_samples, "shape": correct["shape"] / num_samples,
            "samples": num_samples, "chance": {"colour": 1 / len(synthetic_mm.COLOURS),
                                               "shape": 1 / len(synthetic_mm.SHAPES)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_mm.training.caption_eval", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory (iter_NNNNNNN)")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--zero-images", action="store_true", help="blank every image (the no-vision control)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, [*args.overrides, "data.mock=true", "train.resume=none"])
    world_size = LaunchEnv.from_environ().world_size
    if world_size != 1:
        raise SystemExit("caption_eval runs on one rank")
    _, backend = check_config(cfg, world_size)
    init_parallel(cfg)
    (model,) = build_from_checkpoint(cfg, backend, args.checkpoint, train=False).chunks
    result = caption_accuracy(model, cfg, args.samples, zero_images=args.zero_images)
    print(json.dumps(result), flush=True)
    destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
