"""Multimodal data: the synthetic shapes/tones set and the preprocess -> MMIndexedDataset round trip."""

import io
import json
import shutil
import tarfile
import wave
from pathlib import Path

import numpy
import pytest
from PIL import Image

from megatron_mm.data import synthetic_mm
from megatron_mm.data.mm_indexed import MMIndexedDataset, format_summary, preprocess_mm
from megatron_mm.data.tokenizer import build_tokenizer, train_sentencepiece

NUM_IMAGES, NUM_AUDIO = 24, 8
INTERLEAVED = {"text": "Look: <image> shows shapes, then <audio> plays tones and <image> ends it.",
               "images": ["img/000001.png", "img/000002.png"], "audio": ["aud/000001.wav"]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mm")


@pytest.fixture(scope="module")
def synthetic_manifest(workdir) -> Path:
    """The synthetic set plus one interleaved document (last line)."""
    manifest = synthetic_mm.write_synthetic_set(str(workdir / "synthetic"), NUM_IMAGES, NUM_AUDIO, seed=7)
    with open(manifest, "a", encoding="utf-8") as out:
        out.write(json.dumps(INTERLEAVED) + "\n")
    return manifest


def records_of(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tokenizers(workdir, synthetic_manifest) -> dict[str, str]:
    """A tiny sentencepiece model and a tiny HF tokenizer.json, both trained on the captions."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [record["text"] for record in records_of(synthetic_manifest)]
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    hf.save(str(workdir / "tokenizer.json"))
    # Byte fallback needs ~260 pieces plus the characters: the vocabulary is the bytes and a few merges.
    sentencepiece_model = train_sentencepiece(str(synthetic_manifest), "text", 290, str(workdir / "sp"))
    return {"huggingface": str(workdir / "tokenizer.json"), "sentencepiece": sentencepiece_model}


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in sorted(directory.rglob("*"))
            if path.is_file()}


def output_bytes(prefix: Path) -> tuple[bytes, bytes]:
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def preprocess(manifest, tokenizer_type, tokenizer_model, prefix, **kwargs) -> dict:
    return preprocess_mm([str(manifest)], tokenizer_type, tokenizer_model, str(prefix), append_eod=True,
                         progress=False, **kwargs)


# --- the synthetic set ------------------------------------------------------------------------------------------

def test_synthetic_set_is_deterministic_for_a_seed(tmp_path):
    first, second, other = (synthetic_mm.write_synthetic_set(str(tmp_path / name), 6, 3, seed)
                            for name, seed in (("a", 1), ("b", 1), ("c", 2)))
    assert files_of(first.parent) == files_of(second.parent)
    assert files_of(first.parent) != files_of(other.parent)
    assert len(files_of(first.parent)) == 6 + 3 + 1


def count_components(mask: numpy.ndarray) -> int:
    """4-connected components of a boolean mask (a flood fill; the images are tiny)."""
    seen, components = numpy.zeros_like(mask), 0
    for start in zip(*numpy.nonzero(mask)):
        if seen[start]:
            continue
        components += 1
        stack = [start]
        while stack:
            y, x = stack.pop()
            if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and mask[y, x] and not seen[y, x]:
                seen[y, x] = True
                stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
    return components


def test_image_captions_match_the_rendered_pixels(synthetic_manifest):
    records = [record for record in records_of(synthetic_manifest) if "attributes" in record and "images" in record]
    assert len(records) == NUM_IMAGES
    for record in records:
        attributes = record["attributes"]
        assert record["text"] == synthetic_mm.image_caption(attributes)
        assert attributes["colour"] in record["text"] and attributes["shape"] in record["text"]
        pixels = numpy.asarray(Image.open(synthetic_manifest.parent / record["images"][0]).convert("RGB"))
        colour_counts = {name: int((pixels == rgb).all(-1).sum()) for name, rgb in synthetic_mm.COLOURS.items()}
        shape_mask = (pixels == synthetic_mm.COLOURS[attributes["colour"]]).all(-1)
        background = (pixels == synthetic_mm.BACKGROUND).all(-1)
        # Only the caption's colour is drawn, and every pixel is either it or the background.
        assert colour_counts[attributes["colour"]] > 40
        assert sum(colour_counts.values()) == colour_counts[attributes["colour"]]
        assert (shape_mask | background).all()
        assert count_components(shape_mask) == attributes["count"]
        if attributes["position"] is not None:
            ys, xs = numpy.nonzero(shape_mask)
            (x, y), _ = synthetic_mm.POSITIONS[attributes["position"]]
            assert abs(xs.mean() - x) <= 4 and abs(ys.mean() - y) <= 5  # a triangle's centroid sits low


def test_audio_captions_match_the_tone_pitches(synthetic_manifest):
    records = [record for record in records_of(synthetic_manifest) if "attributes" in record and "audio" in record]
    assert len(records) == NUM_AUDIO
    tone = int(synthetic_mm.TONE_SECONDS * synthetic_mm.SAMPLE_RATE)
    step = tone + int(synthetic_mm.GAP_SECONDS * synthetic_mm.SAMPLE_RATE)
    for record in records:
        with wave.open(str(synthetic_manifest.parent / record["audio"][0])) as clip:
            assert (clip.getframerate(), clip.getnchannels(), clip.getsampwidth()) == (16000, 1, 2)
            samples = numpy.frombuffer(clip.readframes(clip.getnframes()), "<i2").astype(numpy.float64)
        heard = []
        for start in range(0, len(samples), step):
            spectrum = numpy.abs(numpy.fft.rfft(samples[start:start + tone]))
            peak_hz = numpy.argmax(spectrum) * synthetic_mm.SAMPLE_RATE / tone
            heard.append(min(synthetic_mm.PITCHES, key=lambda name: abs(synthetic_mm.PITCHES[name] - peak_hz)))
        assert " ".join(heard) == record["text"] == " ".join(record["attributes"]["pitches"])
        assert 2 <= len(heard) <= 4


def test_synthetic_cli(tmp_path, capsys):
    synthetic_mm.main(["--output", str(tmp_path), "--images", "2", "--audio", "1", "--seed", "0"])
    assert len(records_of(tmp_path / "manifest.jsonl")) == 3
    assert "wrote 2 images and 1 audio clips" in capsys.readouterr().out


# --- preprocessing ------------------------------------------------------------------------------------------------

def expected_tokens_and_positions(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Token ids of the text pieces between markers, and the token index of every marker."""
    tokens, positions = [], []
    for piece in text.replace("<audio>", "<image>").split("<image>"):
        tokens += tokenizer.tokenize(piece) if piece else []
        positions.append(len(tokens))
    return tokens + [tokenizer.eod], positions[:-1]


@pytest.mark.parametrize("media_format", ["raw", "pixels"])
@pytest.mark.parametrize("tokenizer_type", ["huggingface", "sentencepiece"])
def test_round_trip(tokenizer_type, media_format, synthetic_manifest, tokenizers, tmp_path):
    tokenizer = build_tokenizer(tokenizer_type, tokenizers[tokenizer_type])
    summary = preprocess(synthetic_manifest, tokenizer_type, tokenizers[tokenizer_type], tmp_path / "out",
                         media_format=media_format)
    records = records_of(synthetic_manifest)
    assert (summary["samples"], summary["image"], summary["audio"], summary["skipped"]) == (
        NUM_IMAGES + NUM_AUDIO + 1, NUM_IMAGES + 2, NUM_AUDIO + 1, {})
    dataset = MMIndexedDataset(str(tmp_path / "out"))
    assert len(dataset) == len(records)
    for index, record in enumerate(records):
        sample = dataset[index]
        assert sample.tokens.dtype == numpy.int32
        paths = [("image", path) for path in record.get("images", [])] + [("audio", path) for path in
                                                                            record.get("audio", [])]
        if "<image>" in record["text"]:  # the interleaved document: media in marker order
            paths = [paths[0], paths[2], paths[1]]
            assert [kind for kind, _ in paths] == ["image", "audio", "image"]
        tokens, positions = expected_tokens_and_positions(tokenizer, record["text"])
        assert sample.tokens.tolist() == tokens
        assert [media.position for media in sample.media] == (positions or [0] * len(paths))
        assert [media.kind for media in sample.media] == [kind for kind, _ in paths]
        for media, (kind, path) in zip(sample.media, paths):
            data = (synthetic_manifest.parent / path).read_bytes()
            if kind == "image" and media_format == "pixels":
                expected = numpy.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                assert media.data.dtype == numpy.uint8 and media.data.shape == (64, 64, 3)
                numpy.testing.assert_array_equal(media.data, expected)
            else:
                assert media.data == data
    interleaved = dataset[-1]
    assert 0 < interleaved.media[0].position < interleaved.media[1].position < interleaved.media[2].position


def write_shards(manifest: Path, shard_dir: Path, samples_per_shard: int) -> list[str]:
    """The manifest's samples as WebDataset shards: key.json holds the record, media are key.N.ext."""
    shard_dir.mkdir()
    records, shards = records_of(manifest), []
    for first in range(0, len(records), samples_per_shard):
        shards.append(str(shard_dir / f"shard-{len(shards):04d}.tar"))
        with tarfile.open(shards[-1], "w") as shard:
            for key, record in enumerate(records[first:first + samples_per_shard], start=first):
                members = {"json": json.dumps(record).encode()}
                for index, path in enumerate(record.get("images", []) + record.get("audio", [])):
                    members[f"{index}.{path.rpartition('.')[2]}"] = (manifest.parent / path).read_bytes()
                for extension, data in members.items():
                    info = tarfile.TarInfo(f"{key:06d}.{extension}")
                    info.size = len(data)
                    shard.addfile(info, io.BytesIO(data))
    return shards


def test_webdataset_shards_and_jsonl_give_identical_outputs(synthetic_manifest, tokenizers, tmp_path):
    model = tokenizers["huggingface"]
    preprocess(synthetic_manifest, "huggingface", model, tmp_path / "jsonl", media_format="pixels")
    shards = write_shards(synthetic_manifest, tmp_path / "shards", samples_per_shard=10)
    assert len(shards) == 4
    summary = preprocess_mm(shards, "huggingface", model, str(tmp_path / "wds"), input_format="webdataset",
                            media_format="pixels", append_eod=True, progress=False)
    assert summary["samples"] == NUM_IMAGES + NUM_AUDIO + 1
    assert output_bytes(tmp_path / "wds") == output_bytes(tmp_path / "jsonl")


def test_one_and_two_workers_identical(synthetic_manifest, tokenizers, tmp_path, monkeypatch):
    from megatron_mm.data import mm_indexed

    monkeypatch.setattr(mm_indexed, "ITEMS_PER_CHUNK", 4)  # several chunks in flight per worker
    model = tokenizers["sentencepiece"]
    preprocess(synthetic_manifest, "sentencepiece", model, tmp_path / "one", workers=1)
    preprocess(synthetic_manifest, "sentencepiece", model, tmp_path / "two", workers=2)
    assert output_bytes(tmp_path / "one") == output_bytes(tmp_path / "two")


def test_bad_inputs_are_counted_and_skipped(synthetic_manifest, tokenizers, tmp_path):
    directory = tmp_path / "bad"
    shutil.copytree(synthetic_manifest.parent, directory)
    (directory / "img/000003.png").write_bytes((directory / "img/000003.png").read_bytes()[:60])
    (directory / "aud/000002.wav").write_bytes(b"RIFF this is not a wave file")
    (directory / "img/000004.png").unlink()
    good = records_of(synthetic_manifest)
    lines = [json.dumps(record) for record in good] + [
        '{"text": "unterminated',
        "",
        "[1, 2]",
        json.dumps({"images": ["img/000001.png"]}),
        json.dumps({"text": "two <image> markers <image>", "images": ["img/000001.png"]}),
        json.dumps({"text": "a path list", "images": "img/000001.png"}),
    ]
    (directory / "manifest.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    summary = preprocess(directory / "manifest.jsonl", "huggingface", tokenizers["huggingface"], tmp_path / "out",
                         workers=2)
    assert summary["skipped"] == {"blank_line": 1, "malformed_json": 1, "not_an_object": 1, "missing_text": 1,
                                  "bad_media_list": 1, "marker_mismatch": 1, "missing_file": 1, "corrupt_image": 1,
                                  "corrupt_audio": 1}
    assert (summary["items"], summary["samples"]) == (len(lines), len(good) - 3)
    written = [record["text"] for record in good if record.get("images", [""])[0] not in (
        "img/000003.png", "img/000004.png") and record.get("audio", [""])[0] != "aud/000002.wav"]
    tokenizer = build_tokenizer("huggingface", tokenizers["huggingface"])
    dataset = MMIndexedDataset(str(tmp_path / "out"))
    assert [tokenizer.detokenize(dataset[i].tokens[:-1]) for i in range(len(dataset) - 1)] == written[:-1]
    report = format_summary(summary)
    assert "skipped: 9" in report and "corrupt_image: 1" in report and "missing_file: 1" in report


def test_preprocess_tool(synthetic_manifest, tokenizers, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("preprocess_mm_data", Path(__file__).parents[2] / "tools" /
                                                  "preprocess_mm_data.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main(["--input", str(synthetic_manifest), "--tokenizer-type", "huggingface", "--tokenizer-model",
               tokenizers["huggingface"], "--output-prefix", str(tmp_path / "out"), "--no-progress"])
    assert f"samples written: {NUM_IMAGES + NUM_AUDIO + 1}" in capsys.readouterr().out
    assert len(MMIndexedDataset(str(tmp_path / "out"))) == NUM_IMAGES + NUM_AUDIO + 1


def test_synthetic_cli_writes_audio_only_when_asked(tmp_path, capsys):
    synthetic_mm.main(["--output", str(tmp_path), "--images", "3", "--seed", "0"])
    records = records_of(tmp_path / "manifest.jsonl")
    assert len(records) == 3 and all("audio" not in record for record in records)
    assert not list((tmp_path / "aud").iterdir())
