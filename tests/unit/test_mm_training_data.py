"""Multimodal training data: mm_indexed samples expanded, packed and blended (data/mm_training.py),
checked against each sample decoded and expanded alone from its original pixels and waveforms."""

import io
import json
import math
import subprocess
import sys
import wave
from pathlib import Path
from types import SimpleNamespace

import numpy
import pytest
import torch
from PIL import Image

from megatron_mm.config import Config, DataConfig, TrainConfig
from megatron_mm.data import mm_training, synthetic_mm
from megatron_mm.data.mm_indexed import MediaRecord, MMIndexedDataset, MMIndexedWriter, MMSample
from megatron_mm.data.mm_training import blending_indices, build_mm_datasets

REPO = Path(__file__).resolve().parents[2]
PAD, IMAGE_ID, AUDIO_ID, EOD, FIRST_WORD = 0, 1, 2, 3, 10
PATCH, AUDIO_CHUNK = 16, 1600
SEQ_LENGTH, WINDOW = 128, 4
IMAGE_SIZES = ((16, 16), (32, 48), (64, 32), (20, 70))


class TinyImageProcessor:
    """ceil(h/16) * ceil(w/16) placeholders: the image in 16x16 patches, zero-padded."""

    modality, placeholder_id = "image", IMAGE_ID

    def __call__(self, image):
        height, width = image.shape[:2]
        rows, cols = math.ceil(height / PATCH), math.ceil(width / PATCH)
        padded = numpy.zeros((rows * PATCH, cols * PATCH, 3), numpy.float32)
        padded[:height, :width] = image / 255.0
        patches = torch.from_numpy(padded).reshape(rows, PATCH, cols, PATCH, 3).permute(0, 2, 1, 3, 4)
        media = {"patches": patches.reshape(rows * cols, -1), "image_sizes": torch.tensor([[height, width]])}
        return media, rows * cols

    def num_placeholders(self, height, width):
        return math.ceil(height / PATCH) * math.ceil(width / PATCH)


class TinyAudioProcessor:
    """One placeholder per 1600 samples; no num_placeholders, so packing measures it on blank clips."""

    modality, placeholder_id = "audio", AUDIO_ID

    def __call__(self, waveform):
        chunks = math.ceil(len(waveform) / AUDIO_CHUNK)
        padded = numpy.zeros(chunks * AUDIO_CHUNK, numpy.float32)
        padded[:len(waveform)] = waveform
        return {"audio_frames": torch.from_numpy(padded.reshape(chunks, AUDIO_CHUNK))}, chunks


PROCESSORS = {"image": TinyImageProcessor(), "audio": TinyAudioProcessor()}


def png_bytes(pixels):
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def wav_bytes(samples):
    out = io.BytesIO()
    with wave.open(out, "wb") as clip:
        clip.setnchannels(1), clip.setsampwidth(2), clip.setframerate(16000)
        clip.writeframes(samples.astype("<i2").tobytes())
    return out.getvalue()


def write_source(prefix, specs):
    """specs: (text ids, [(kind, position, original item, stored as "png"/"pixels"/"wav")])."""
    writer = MMIndexedWriter(f"{prefix}.bin")
    for text, media in specs:
        records = [MediaRecord(kind, position, {"png": png_bytes, "wav": wav_bytes, "pixels": numpy.asarray}[how](item))
                   for kind, position, item, how in media]
        writer.add_sample(MMSample(numpy.asarray(text, dtype=numpy.int32), records))
    writer.finalize(f"{prefix}.idx")
    return str(prefix)


def random_image(rng, size=None):
    height, width = size or IMAGE_SIZES[rng.integers(len(IMAGE_SIZES))]
    return rng.integers(0, 256, (height, width, 3), dtype=numpy.uint8)


def random_text(rng, low, high):
    return rng.integers(FIRST_WORD, 200, rng.integers(low, high)).tolist() + [EOD]


def caption_specs(rng, count, image_size=None, texts=None):
    return [(texts[i] if texts else random_text(rng, 3, 20), [("image", 0, random_image(rng, image_size), "png")])
            for i in range(count)]


def document_specs(rng, count):
    specs = []
    for _ in range(count):
        text = random_text(rng, 5, 30)
        media = [("image", int(p), random_image(rng), "pixels") for p in rng.integers(0, len(text), rng.integers(0, 3))]
        if rng.random() < 0.5:
            media.append(("audio", int(rng.integers(0, len(text))), audio_clip(rng), "wav"))
        specs.append((text, sorted(media, key=lambda record: record[1])))
    return specs


def audio_clip(rng):
    return rng.integers(-20000, 20000, int(rng.integers(800, 8000))).astype(numpy.int16)


def audio_specs(rng, count):
    return [(random_text(rng, 2, 8), [("audio", 0, audio_clip(rng), "wav")]) for _ in range(count)]


def reference_sample(spec, position_ids_fn=None, max_length=None):
    """One sample expanded alone, from its original items."""
    text, media = spec
    tokens, items, cursor = [], {}, 0
    for kind, position, item, _ in media:
        waveform_or_pixels = item.astype(numpy.float32) / 32768 if kind == "audio" else item
        inputs, count = PROCESSORS[kind](waveform_or_pixels)
        tokens += text[cursor:position] + [PROCESSORS[kind].placeholder_id] * count
        cursor = position
        for key, value in inputs.items():
            items.setdefault(key, []).append(value)
    tokens = torch.tensor(tokens + text[cursor:])[:max_length]
    labels = torch.cat([tokens[1:], torch.tensor([PAD])])
    loss_mask = torch.tensor([0.0 if label in (IMAGE_ID, AUDIO_ID) else 1.0 for label in labels.tolist()])
    loss_mask[-1] = 0.0
    media = {key: torch.cat(values) for key, values in items.items()}
    positions = position_ids_fn(tokens, media) if position_ids_fn else torch.arange(len(tokens))
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": positions, **media}


def reference_first_fit(lengths, seq_length, window):
    """Stream index lists of the sequences, first-fit over the last `window` open ones (plain lists)."""
    bins, closed = [], []
    for index, length in enumerate(lengths):
        for members in bins:
            if sum(lengths[i] for i in members) + length <= seq_length:
                members.append(index)
                break
        else:
            bins.append([index])
            if len(bins) > window:
                closed.append(bins.pop(0))
    return closed


def make_config(blend, seed=5, split="1,0,0", seq_length=SEQ_LENGTH):
    return Config(model=None, data=DataConfig(blend=blend, split=split, seq_length=seq_length),
                  train=TrainConfig(seed=seed))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three sources (captions: PNG of four sizes; documents: interleaved stored pixels and WAV;
    audio: WAV) -> (prefix, specs) each."""
    root = tmp_path_factory.mktemp("mm_training")
    rng = numpy.random.default_rng(0)
    made = {"captions": caption_specs(rng, 40), "documents": document_specs(rng, 20), "audio": audio_specs(rng, 20)}
    return {name: (write_source(root / name, specs), specs) for name, specs in made.items()}


def assert_matches_reference(dataset, specs_of_source, position_ids_fn=None):
    """Every sequence: each packed sample equals the sample alone, media rows in order, padding inert."""
    for index in range(len(dataset)):
        sequence, start = dataset[index], 0
        rows = {key: 0 for key in sequence if key not in mm_training.TEXT_KEYS}  # media rows matched so far
        assert all(sequence[key].shape[-1] == SEQ_LENGTH for key in mm_training.TEXT_KEYS)
        for source, sample, length in dataset.members(index):
            expected = reference_sample(specs_of_source[source][sample], position_ids_fn, max_length=length)
            for key in mm_training.TEXT_KEYS:
                packed = sequence[key][..., start:start + length]
                assert torch.equal(packed, expected[key].to(packed.dtype)), (index, sample, key)
            for key in rows:
                count = len(expected.get(key, ()))
                assert torch.equal(sequence[key][rows[key]:rows[key] + count], expected.get(key, sequence[key][:0]))
                rows[key] += count
            start += length
        assert start <= SEQ_LENGTH
        assert rows == {key: len(sequence[key]) for key in rows}  # no media beyond the packed samples'
        assert (sequence["tokens"][start:] == PAD).all() and (sequence["loss_mask"][start:] == 0).all()


def test_packed_sequences_equal_samples_alone_and_follow_first_fit(sources):
    names = ["captions", "documents", "audio"]
    blend = [x for name, weight in zip(names, ("0.5", "0.3", "0.2")) for x in (weight, sources[name][0])]
    num_sequences = 40
    train, _, _ = build_mm_datasets(make_config(blend), PROCESSORS, (num_sequences, 0, 0), packing_window=WINDOW)
    specs = [sources[name][1] for name in names]
    assert len(train) == num_sequences
    assert_matches_reference(train, specs)

    # The plan, made from index headers, is the first-fit of the lengths found by decoding everything.
    read = train.stats["stream_samples_read"]
    stream = [train.stream[position] for position in range(read)]
    lengths = [len(reference_sample(specs[source][sample])["tokens"]) for source, sample in stream]
    expected_bins = reference_first_fit(lengths, SEQ_LENGTH, WINDOW)[:num_sequences]
    assert [[stream[i] + (lengths[i],) for i in members] for members in expected_bins] == \
        [train.members(index) for index in range(num_sequences)]

    # Each source walks all its samples once per epoch.
    for source, spec in enumerate(specs):
        first_epoch = [sample for s, sample in stream if s == source][:len(spec)]
        assert len(first_epoch) < len(spec) or sorted(first_epoch) == list(range(len(spec)))


def test_more_sequences_pack_every_sample_read_exactly_once(sources):
    blend = [sources["documents"][0], sources["audio"][0]]
    small, _, _ = build_mm_datasets(make_config(blend), PROCESSORS, (10, 0, 0), packing_window=WINDOW)
    large, _, _ = build_mm_datasets(make_config(blend), PROCESSORS, (10 + WINDOW, 0, 0), packing_window=WINDOW)
    assert [large.members(i) for i in range(10)] == [small.members(i) for i in range(10)]
    positions = large.plan.stream_positions.tolist()
    assert len(set(positions)) == len(positions)
    assert set(range(small.stats["stream_samples_read"])) <= set(positions) | set(large.plan.dropped_positions)
    for index in range(len(large)):  # stream order inside each sequence and across their first samples
        span = positions[large.plan.offsets[index]:large.plan.offsets[index + 1]]
        assert span == sorted(span)
    firsts = [positions[start] for start in large.plan.offsets[:-1]]
    assert firsts == sorted(firsts)


def test_image_size_sets_placeholders_and_packing_adapts(tmp_path):
    rng = numpy.random.default_rng(1)
    texts = [random_text(rng, 3, 6) for _ in range(30)]
    per_sequence = {}
    for size in ((16, 16), (48, 48)):
        prefix = write_source(tmp_path / f"caption_{size[0]}", caption_specs(rng, 30, size, texts))
        train, _, _ = build_mm_datasets(make_config([prefix]), PROCESSORS, (6, 0, 0), packing_window=WINDOW)
        for index in range(len(train)):
            sequence = train[index]
            assert int((sequence["tokens"] == IMAGE_ID).sum()) == len(train.members(index)) * (size[0] // PATCH) ** 2
            assert len(sequence["patches"]) == len(train.members(index)) * (size[0] // PATCH) ** 2
        per_sequence[size] = train.stats["samples"] / len(train)
    # 1 vs 9 placeholders per image with 4-9 text tokens: several more samples fit in a sequence.
    assert per_sequence[(16, 16)] > 1.5 * per_sequence[(48, 48)]


def test_blend_order_keeps_weights_at_every_prefix_and_in_the_packed_data(sources):
    for weights in ([0.7, 0.3], [5, 3, 2], [0.25, 0.25, 0.4, 0.1]):
        chosen, _ = blending_indices(weights, 2000)
        counts = numpy.cumsum(numpy.eye(len(weights))[chosen], axis=0)
        expected = numpy.outer(numpy.arange(1, 2001), numpy.asarray(weights) / sum(weights))
        assert numpy.abs(counts - expected).max() <= 1.0

    blend = ["0.7", sources["captions"][0], "0.3", sources["audio"][0]]
    train, _, _ = build_mm_datasets(make_config(blend), PROCESSORS, (60, 0, 0))
    shares = numpy.bincount(train.plan.sources, minlength=2) / len(train.plan.sources)
    assert abs(shares[0] - 0.7) < 0.02 and abs(shares[1] - 0.3) < 0.02, shares


def test_builds_are_deterministic_and_the_seed_reorders(sources):
    blend = ["0.6", sources["captions"][0], "0.4", sources["documents"][0]]
    first, second, reseeded = (build_mm_datasets(make_config(blend, seed), PROCESSORS, (12, 0, 0))[0]
                               for seed in (5, 5, 6))
    for index in range(len(first)):
        a, b = first[index], second[index]
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert [first.members(i) for i in range(12)] != [reseeded.members(i) for i in range(12)]


def test_too_long_samples_are_cut_in_text_or_dropped_and_counted(tmp_path):
    rng = numpy.random.default_rng(2)
    long_text = rng.integers(FIRST_WORD, 200, 300).tolist()
    specs = [
        (random_text(rng, 5, 10), [("image", 0, random_image(rng, (32, 32)), "png")]),
        (long_text, [("image", 0, random_image(rng, (192, 192)), "png")]),  # 144 placeholders > 128
        (long_text, [("image", 0, random_image(rng, (32, 32)), "png")]),  # cut in its text
        (long_text, [("image", 200, random_image(rng, (32, 32)), "png")]),  # cutting the text would drop media
        (random_text(rng, 5, 10), [("audio", 3, audio_clip(rng), "wav")]),
    ]
    prefix = write_source(tmp_path / "long", specs)
    train, _, _ = build_mm_datasets(make_config([prefix]), PROCESSORS, (6, 0, 0))
    packed = train.plan.samples.tolist()
    dropped = [train.stream[p][1] for p in train.plan.dropped_positions.tolist()]
    assert set(dropped) == {1, 3} and not {1, 3} & set(packed)
    assert train.stats["dropped"] == len(dropped)
    assert train.stats["truncated"] == packed.count(2)
    assert train.stats["truncated_tokens"] == packed.count(2) * (300 + 4 - SEQ_LENGTH)
    assert_matches_reference(train, [specs])


def test_mrope_positions_restart_per_sample(sources):
    def position_ids_fn(tokens, media):  # [3, S]: distinct rows, and a dependence on the sample's media
        steps = torch.arange(len(tokens))
        return torch.stack([steps, 2 * steps, steps + len(media.get("patches", ()))])

    train, _, _ = build_mm_datasets(make_config([sources["documents"][0]]), PROCESSORS, (8, 0, 0), position_ids_fn)
    assert train[0]["position_ids"].shape == (3, SEQ_LENGTH)
    assert_matches_reference(train, [sources["documents"][1]], position_ids_fn)


def test_splits_partition_each_source(sources):
    blend = [sources["captions"][0], sources["audio"][0]]
    train, valid, test = build_mm_datasets(make_config(blend, split="6,2,2"), PROCESSORS, (30, 8, 8))
    seen = {}
    for name, dataset in (("train", train), ("valid", valid), ("test", test)):
        for source, sample in zip(dataset.plan.sources.tolist(), dataset.plan.samples.tolist()):
            seen.setdefault((source, sample), set()).add(name)
    assert all(len(names) == 1 for names in seen.values())
    for source, count in ((0, 40), (1, 20)):
        bounds = mm_training.split_bounds(count, "6,2,2")
        for name, (begin, end) in zip(("train", "valid", "test"), bounds):
            assert {sample for (s, sample), names in seen.items() if s == source and name in names} <= \
                set(range(begin, end))
    assert build_mm_datasets(make_config(blend, split="1,0,0"), PROCESSORS, (4, 4, 4))[1:] == (None, None)


def test_media_sizes_come_from_headers(sources):
    for name in ("captions", "documents", "audio"):
        prefix, specs = sources[name]
        dataset = MMIndexedDataset(prefix)
        for index, (text, media) in enumerate(specs):
            assert dataset.num_tokens(index) == len(text)
            assert dataset.media_sizes(index) == [(kind, position, item.shape[:2] if kind == "image" else
                                                   (len(item), 16000)) for kind, position, item, _ in media]


@pytest.mark.parametrize("media_format", ["raw", "pixels"])
def test_round_trip_from_preprocess_tool_on_the_synthetic_set(tmp_path, media_format):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    manifest = synthetic_mm.write_synthetic_set(str(tmp_path / "synthetic"), 12, 6, seed=3)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([r["text"] for r in records],
                                  trainers.BpeTrainer(vocab_size=80, special_tokens=["<|endoftext|>", "<pad>",
                                                                                     "<img>", "<aud>"],
                                                      show_progress=False))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    prefix = tmp_path / "synthetic_mm"
    subprocess.run([sys.executable, str(REPO / "tools/preprocess_mm_data.py"), "--input", str(manifest),
                    "--tokenizer-type", "huggingface", "--tokenizer-model", str(tmp_path / "tokenizer.json"),
                    "--output-prefix", str(prefix), "--media-format", media_format, "--append-eod",
                    "--no-progress"], check=True, capture_output=True, cwd=REPO)

    image_id, audio_id = tokenizer.token_to_id("<img>"), tokenizer.token_to_id("<aud>")
    processors = [TinyImageProcessor(), TinyAudioProcessor()]
    for processor in processors:  # the ids come from the model config instead
        processor.placeholder_id = None
    cfg = make_config([str(prefix)])
    cfg.model = SimpleNamespace(placeholder_ids=lambda: {"image": image_id, "audio": audio_id})
    train, _, _ = build_mm_datasets(cfg, processors, (6, 0, 0), pad_token_id=tokenizer.token_to_id("<pad>"))
    processors = dict(zip(("image", "audio"), processors))
    eod = tokenizer.token_to_id("<|endoftext|>")
    for index in range(len(train)):
        sequence, start, image_rows, audio_rows = train[index], 0, 0, 0
        for _, sample, length in train.members(index):
            record = records[sample]
            text = tokenizer.encode(record["text"]).ids + [eod]
            if "images" in record:
                pixels = numpy.asarray(Image.open(manifest.parent / record["images"][0]).convert("RGB"))
                media, count = processors["image"](pixels)
                assert torch.equal(sequence["patches"][image_rows:image_rows + count], media["patches"])
                image_rows, placeholder = image_rows + count, image_id
            else:
                with wave.open(str(manifest.parent / record["audio"][0])) as clip:
                    samples = numpy.frombuffer(clip.readframes(clip.getnframes()), "<i2")
                media, count = processors["audio"](samples.astype(numpy.float32) / 32768)
                assert torch.equal(sequence["audio_frames"][audio_rows:audio_rows + count], media["audio_frames"])
                audio_rows, placeholder = audio_rows + count, audio_id
            assert sequence["tokens"][start:start + length].tolist() == [placeholder] * count + text
            start += length
        assert (image_rows, audio_rows) == (len(sequence["patches"]), len(sequence["audio_frames"]))


def test_samples_with_media_without_a_processor_are_left_out(sources):
    prefix, specs = sources["documents"]
    image_only = {"image": PROCESSORS["image"]}
    train, _, _ = build_mm_datasets(make_config([prefix]), image_only, (12, 0, 0), packing_window=WINDOW)
    with_audio = {index for index, (_, media) in enumerate(specs) if any(kind == "audio" for kind, *_ in media)}
    assert 0 < len(with_audio) < len(specs)
    assert train.stats["left_out"] == {"audio": len(with_audio)}
    assert "samples with audio left out" in mm_training.format_packing_stats("train", train.stats)
    packed = set(train.plan.samples.tolist())
    assert packed == set(range(len(specs))) - with_audio  # every other sample, none holding audio
    assert_matches_reference(train, [specs])


def test_a_source_of_media_the_model_cannot_take_is_refused_with_a_hint(sources):
    from megatron_mm.config import load_config
    from megatron_mm.errors import UserError
    from megatron_mm.training.batches import build_datasets

    audio_prefix = sources["audio"][0]
    cfg = load_config(REPO / "examples" / "configs" / "tiny_qwen2_vl.yaml",
                      ["data.mock=false", f"data.blend=[{sources['captions'][0]},{audio_prefix}]"])
    with pytest.raises(UserError) as raised:
        build_datasets(cfg, SimpleNamespace(pad=PAD), (4, 0, 0))
    message = str(raised.value)
    assert message.startswith(f"{audio_prefix} holds only samples with audio, and model.family=qwen2_vl has no "
                              f"audio encoder") and "\n" not in message
    assert "families that take audio: qwen2_audio" in message
