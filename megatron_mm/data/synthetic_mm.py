"""An embedded, learnable multimodal data set that needs no download: shape images and tone sequences.

Images (64x64 RGB PNG, white background, no anti-aliasing so every shape pixel has exactly its colour)
show 1-3 shapes of one kind and colour; a single shape sits at a named position. Captions follow from
the attributes: "two red circles", "a blue square on the left". Audio clips (16 kHz mono 16-bit PCM WAV)
are 2-4 tones from three pitches; the caption names them in order: "low high mid".

`write_synthetic_set` writes img/NNNNNN.png, aud/NNNNNN.wav and manifest.jsonl (the input format of
tools/preprocess_mm_data.py); the attributes are kept in the manifest so that held-out accuracy per
attribute can be measured. Everything is a function of the seed.

    python -m megatron_mm.data.synthetic_mm --output data/synthetic --images 1000 --audio 1000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import random
import wave
from pathlib import Path

import numpy
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
BACKGROUND = (255, 255, 255)
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
# Centre of a single shape, and the phrase that names it.
POSITIONS = {
    "left": ((16, 32), "on the left"),
    "right": ((48, 32), "on the right"),
    "top": ((32, 16), "at the top"),
    "bottom": ((32, 48), "at the bottom"),
    "centre": ((32, 32), "in the centre"),
}
SINGLE_SHAPE_SIZE = 20
# Several shapes go into distinct cells of a 3x3 grid, so they never overlap.
GRID_CELLS = 3
GRID_SHAPE_SIZE = 14

SAMPLE_RATE = 16000
PITCHES = {"low": 220.0, "mid": 440.0, "high": 880.0}
TONE_SECONDS = 0.2
GAP_SECONDS = 0.05
FADE_SECONDS = 0.01  # ramps at both ends of a tone: no clicks
AMPLITUDE = 0.5


def image_caption(attributes: dict) -> str:
    count, colour, shape = attributes["count"], attributes["colour"], attributes["shape"]
    noun = shape if count == 1 else f"{shape}s"
    caption = f"{COUNT_WORDS[count]} {colour} {noun}"
    if attributes["position"] is not None:
        caption += f" {POSITIONS[attributes['position']][1]}"
    return caption


def audio_caption(attributes: dict) -> str:
    return " ".join(attributes["pitches"])


def random_image_attributes(rng: random.Random) -> dict:
    count = rng.randint(1, 3)
    return {
        "shape": rng.choice(SHAPES),
        "colour": rng.choice(sorted(COLOURS)),
        "count": count,
        "position": rng.choice(sorted(POSITIONS)) if count == 1 else None,
    }


def random_audio_attributes(rng: random.Random) -> dict:
    return {"pitches": [rng.choice(sorted(PITCHES)) for _ in range(rng.randint(2, 4))]}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[int, int], size: int, fill: tuple) -> None:
    x, y = centre
    half = size // 2
    box = (x - half, y - half, x + half, y + half)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x, y - half), (x - half, y + half), (x + half, y + half)], fill=fill)


def render_image(attributes: dict, rng: random.Random) -> Image.Image:
    """The shapes of `attributes`; `rng` jitters the placement by a few pixels."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    fill = COLOURS[attributes["colour"]]
    if attributes["position"] is not None:
        (x, y), _ = POSITIONS[attributes["position"]]
        centre = (x + rng.randint(-2, 2), y + rng.randint(-2, 2))
        _draw_shape(draw, attributes["shape"], centre, SINGLE_SHAPE_SIZE, fill)
        return image
    cell = IMAGE_SIZE // GRID_CELLS
    for index in rng.sample(range(GRID_CELLS * GRID_CELLS), attributes["count"]):
        row, column = divmod(index, GRID_CELLS)
        centre = (column * cell + cell // 2 + rng.randint(-1, 1), row * cell + cell // 2 + rng.randint(-1, 1))
        _draw_shape(draw, attributes["shape"], centre, GRID_SHAPE_SIZE, fill)
    return image


def render_tones(attributes: dict) -> numpy.ndarray:
    """int16 samples: each pitch as a faded sine tone, followed by a short silence."""
    tone_samples = int(TONE_SECONDS * SAMPLE_RATE)
    fade_samples = int(FADE_SECONDS * SAMPLE_RATE)
    time = numpy.arange(tone_samples) / SAMPLE_RATE
    ramp = numpy.arange(tone_samples)
    envelope = numpy.minimum(1.0, numpy.minimum(ramp, ramp[::-1]) / fade_samples)
    gap = numpy.zeros(int(GAP_SECONDS * SAMPLE_RATE))
    pieces = []
    for pitch in attributes["pitches"]:
        pieces += [AMPLITUDE * envelope * numpy.sin(2 * math.pi * PITCHES[pitch] * time), gap]
    return numpy.round(numpy.concatenate(pieces) * 32767).astype("<i2")


def write_wav(path: Path, samples: numpy.ndarray) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(samples.tobytes())


def write_synthetic_set(out_dir: str, num_images: int, num_audio: int, seed: int) -> Path:
    """Write `num_images` images, `num_audio` clips and their manifest.jsonl; returns the manifest path."""
    out = Path(out_dir)
    (out / "img").mkdir(parents=True, exist_ok=True)
    (out / "aud").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records = []
    for number in range(1, num_images + 1):
        attributes = random_image_attributes(rng)
        name = f"img/{number:06d}.png"
        render_image(attributes, rng).save(out / name)
        records.append({"text": image_caption(attributes), "images": [name], "attributes": attributes})
    for number in range(1, num_audio + 1):
        attributes = random_audio_attributes(rng)
        name = f"aud/{number:06d}.wav"
        write_wav(out / name, render_tones(attributes))
        records.append({"text": audio_caption(attributes), "audio": [name], "attributes": attributes})
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return manifest


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic shapes-and-tones multimodal set.")
    parser.add_argument("--output", required=True, help="directory for img/, aud/ and manifest.jsonl")
    parser.add_argument("--images", type=int, default=1000, help="number of image-caption pairs")
    parser.add_argument("--audio", type=int, default=0,
                        help="number of audio-caption pairs (for audio families; none unless asked for)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    manifest = write_synthetic_set(args.output, args.images, args.audio, args.seed)
    print(f"wrote {args.images} images and {args.audio} audio clips; manifest: {manifest}")


if __name__ == "__main__":
    main()
