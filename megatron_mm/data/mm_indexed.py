"""Multimodal samples (token ids + image/audio records) in one indexed binary format, PREFIX.{bin,idx}.

Inputs: a JSONL manifest ({"text": ..., "images": [paths], "audio": [paths]}, paths relative to the
manifest) or WebDataset tar shards (members grouped by key, the name up to the first dot: key.txt or
key.json "text"; key.png/.jpg/.jpeg images and key.wav audio, several as key.0.png, key.1.png, ...).
Text may interleave "<image>"/"<audio>" markers: the i-th marker of a kind is that kind's i-th file,
placed at the token position where the marker stood (the text pieces are tokenized one by one). Text
without markers is a pair: every media record sits at position 0 (images first, then audio).

Layout, all little-endian. PREFIX.bin: per sample its token ids (int32) then its media payloads, each
padded to 8 bytes. PREFIX.idx:
    header  32 bytes: magic b"MMIDX\\0\\0\\0" | version u32 (=1) | reserved u32 | num_samples u64 | num_media u64
    samples num_samples x SAMPLE_DTYPE: token_offset u64 (in .bin) | token_count u64 | media_start u64 | media_count u64
    media   num_media x MEDIA_DTYPE: kind u8 (0 image, 1 audio) | encoding u8 (0 raw file bytes, 1 array) |
            dtype u8 (array: 1 uint8, 2 int16, 3 float32) | ndim u8 | pad 4 | position i64 (token index) |
            offset u64 (in .bin) | nbytes u64 | shape u64[4]
Raw media are the files' encoded bytes; --media-format pixels stores images decoded to uint8 HxWx3 (RGB).

Bad inputs are counted under a skip reason and skipped (a UTF-8 byte-order mark starting a line is
accepted), and the summary names the first few of each reason; workers keep the input order. A run
that would write no sample is refused. Opening a dataset checks that its .idx is complete and its .bin
holds every byte the index points to.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import time
import wave
from collections import Counter
from itertools import islice
from typing import Iterator, NamedTuple, Sequence, Union

import numpy

from megatron_mm.data.indexed_format import INDEX_MAGIC
from megatron_mm.data.preprocess import REPORTED_LOCATIONS, encode_in_order, format_skipped, skip_counts
from megatron_mm.data.tokenizer import Tokenizer, build_tokenizer
from megatron_mm.errors import UserError

MAGIC = b"MMIDX\x00\x00\x00"
VERSION = 1
HEADER = struct.Struct("<8sIIQQ")
SAMPLE_DTYPE = numpy.dtype([("token_offset", "<u8"), ("token_count", "<u8"), ("media_start", "<u8"),
                            ("media_count", "<u8")])
MEDIA_DTYPE = numpy.dtype([("kind", "u1"), ("encoding", "u1"), ("dtype", "u1"), ("ndim", "u1"), ("pad", "4u1"),
                           ("position", "<i8"), ("offset", "<u8"), ("nbytes", "<u8"), ("shape", "<u8", (4,))])
TOKEN_DTYPE = numpy.dtype("<i4")
KINDS = ("image", "audio")
RAW, ARRAY = 0, 1
ARRAY_DTYPES = {1: numpy.dtype("u1"), 2: numpy.dtype("<i2"), 3: numpy.dtype("<f4")}
ALIGNMENT = 8
MARKERS = {"<image>": "image", "<audio>": "audio"}
MEDIA_FORMATS = ("raw", "pixels")
INPUT_FORMATS = ("jsonl", "webdataset")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")
AUDIO_EXTENSIONS = ("wav",)

SKIP_REASONS = {
    "blank_line": "line is empty or whitespace",
    "invalid_utf8": "bytes are not valid UTF-8",
    "malformed_json": "line (or key.json) is not valid JSON",
    "not_an_object": "JSON value is not an object",
    "missing_text": "no text string (the text key, key.txt or key.json)",
    "bad_media_list": "images/audio is not a list of path strings",
    "marker_mismatch": "number of <image>/<audio> markers differs from the media given",
    "missing_file": "a media file named by the manifest does not exist",
    "corrupt_image": "an image PIL cannot decode",
    "corrupt_audio": "a WAV file the wave module cannot read",
    "empty_sample": "no tokens and no media",
}

ITEMS_PER_CHUNK = 64


class MediaRecord(NamedTuple):
    kind: str  # "image" or "audio"
    position: int  # token index the media is inserted before
    data: Union[bytes, numpy.ndarray]  # encoded file bytes, or a decoded array


class MMSample(NamedTuple):
    tokens: numpy.ndarray
    media: list[MediaRecord]


class SkippedSample(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --- reading inputs: items are cheap to make in the main process; workers do the decoding ---------------

# ("jsonl", manifest directory, line bytes) or ("webdataset", {extension: member bytes})
Item = tuple
# Where an item came from, for the skip summary: a line number (one manifest), else "file:line" or
# "shard:key".
Location = Union[int, str]


def jsonl_items(path: str) -> Iterator[tuple[int, Item]]:
    """(line number, item) per line."""
    base_dir = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            yield number, ("jsonl", base_dir, line)


def webdataset_items(path: str) -> Iterator[tuple[str, Item]]:
    """(key, item) per key; members of a sample are consecutive in a shard, as WebDataset writes them."""
    key, members = None, {}
    try:
        with tarfile.open(path, "r:*") as shard:
            for member in shard:
                if not member.isfile():
                    continue
                directory, _, name = member.name.rpartition("/")
                stem, _, extension = name.partition(".")
                if (directory, stem) != key and members:
                    yield "/".join(filter(None, key)), ("webdataset", members)
                    members = {}
                key = (directory, stem)
                members[extension.lower()] = shard.extractfile(member).read()
    except (tarfile.TarError, EOFError) as err:
        raise UserError(f"{path} is not a readable tar shard (truncated or another format): {err}") from None
    if members:
        yield "/".join(filter(None, key)), ("webdataset", members)


def read_items(paths: Sequence[str], input_format: str) -> Iterator[tuple[Location, Item]]:
    reader = jsonl_items if input_format == "jsonl" else webdataset_items
    for path in paths:
        for location, item in reader(path):
            if len(paths) > 1 or input_format == "webdataset":
                location = f"{os.path.basename(path)}:{location}"
            yield location, item


# --- encoding one sample -----------------------------------------------------------------------------------

class SampleEncoder:
    """Turns an item into (tokens, [(kind, position, payload)]) or a skip reason."""

    def __init__(self, tokenizer: Tokenizer, append_eod: bool, media_format: str):
        self.tokenizer = tokenizer
        self.append_eod = append_eod
        self.media_format = media_format

    def encode(self, item: Item) -> Union[str, MMSample]:
        try:
            if item[0] == "jsonl":
                text, images, audio = self._from_jsonl_line(item[1], item[2])
            else:
                text, images, audio = self._from_webdataset_members(item[1])
            return self._encode_sample(text, images, audio)
        except SkippedSample as skipped:
            return skipped.reason

    def encode_chunk(self, items: list[Item]) -> list[Union[str, MMSample]]:
        return [self.encode(item) for item in items]

    @staticmethod
    def _from_jsonl_line(base_dir: str, line: bytes) -> tuple[str, list[bytes], list[bytes]]:
        if not line.strip():
            raise SkippedSample("blank_line")
        record = _parse_json(line)
        text = record.get("text")
        if not isinstance(text, str):
            raise SkippedSample("missing_text")
        media = {}
        for key in ("images", "audio"):
            paths = record.get(key, [])
            if not isinstance(paths, list) or not all(isinstance(path, str) for path in paths):
                raise SkippedSample("bad_media_list")
            media[key] = [_read_file(os.path.join(base_dir, path)) for path in paths]
        return text, media["images"], media["audio"]

    @staticmethod
    def _from_webdataset_members(members: dict[str, bytes]) -> tuple[str, list[bytes], list[bytes]]:
        if "txt" in members:
            try:
                text = members["txt"].decode("utf-8")
            except UnicodeDecodeError:
                raise SkippedSample("invalid_utf8") from None
        elif "json" in members:
            text = _parse_json(members["json"]).get("text")
        else:
            text = None
        if not isinstance(text, str):
            raise SkippedSample("missing_text")

        def numbered(extensions: tuple[str, ...]) -> list[bytes]:
            # key.png alone, or key.0.png, key.1.png, ... in numeric order
            found = [(name.rpartition(".")[0], data) for name, data in members.items()
                     if name.rpartition(".")[2] in extensions]
            return [data for _, data in sorted(found, key=lambda pair: int(pair[0]) if pair[0].isdigit() else -1)]

        return text, numbered(IMAGE_EXTENSIONS), numbered(AUDIO_EXTENSIONS)

    def _encode_sample(self, text: str, images: list[bytes], audio: list[bytes]) -> MMSample:
        payloads = {"image": [self._image_payload(data) for data in images],
                    "audio": [_checked_audio(data) for data in audio]}
        pieces, kinds = _split_on_markers(text)
        if kinds and (kinds.count("image"), kinds.count("audio")) != (len(images), len(audio)):
            raise SkippedSample("marker_mismatch")
        if not kinds:  # a pair: all media before the text
            kinds = ["image"] * len(images) + ["audio"] * len(audio)
            pieces = [""] * len(kinds) + ["".join(pieces)]
        tokens, media, next_index = [], [], {"image": 0, "audio": 0}
        for piece, kind in zip(pieces, kinds + [None]):
            if piece:
                tokens += self.tokenizer.tokenize(piece)
            if kind is not None:
                media.append(MediaRecord(kind, len(tokens), payloads[kind][next_index[kind]]))
                next_index[kind] += 1
        if not tokens and not media:
            raise SkippedSample("empty_sample")
        if self.append_eod:
            tokens.append(self.tokenizer.eod)
        return MMSample(numpy.asarray(tokens, dtype=TOKEN_DTYPE), media)

    def _image_payload(self, data: bytes) -> Union[bytes, numpy.ndarray]:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # decodes every pixel: a truncated file fails here, not at open
                pixels = numpy.asarray(image.convert("RGB")) if self.media_format == "pixels" else None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            raise SkippedSample("corrupt_image") from None
        return data if pixels is None else pixels


def _parse_json(data: bytes) -> dict:
    try:
        record = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise SkippedSample("invalid_utf8") from None
    except ValueError:
        raise SkippedSample("malformed_json") from None
    if not isinstance(record, dict):
        raise SkippedSample("not_an_object")
    return record


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except (FileNotFoundError, IsADirectoryError):
        raise SkippedSample("missing_file") from None


def _checked_audio(data: bytes) -> bytes:
    """The WAV bytes unchanged, once the wave module has read all of its frames."""
    try:
        with wave.open(io.BytesIO(data), "rb") as clip:
            expected = clip.getnframes() * clip.getnchannels() * clip.getsampwidth()
            complete = len(clip.readframes(clip.getnframes())) == expected
    except (wave.Error, EOFError, ValueError):
        complete = False
    if not complete:
        raise SkippedSample("corrupt_audio")
    return data


def _split_on_markers(text: str) -> tuple[list[str], list[str]]:
    """Text pieces between markers and the marker kinds: len(pieces) == len(kinds) + 1."""
    pieces, kinds, start = [], [], 0
    while True:
        found = [(index, marker) for marker in MARKERS if (index := text.find(marker, start)) >= 0]
        if not found:
            return pieces + [text[start:]], kinds
        index, marker = min(found)
        pieces.append(text[start:index])
        kinds.append(MARKERS[marker])
        start = index + len(marker)


# --- workers (same bounded-window scheme as preprocess.py: order kept, memory bounded) ---------------------

def _sample_encoder(tokenizer_type: str, tokenizer_model: str, append_eod: bool, media_format: str) -> SampleEncoder:
    return SampleEncoder(build_tokenizer(tokenizer_type, tokenizer_model), append_eod, media_format)


def _located_chunks(located_items: Iterator[tuple[Location, Item]]) -> Iterator[tuple[list[Location], list[Item]]]:
    """(locations, items) per chunk of ITEMS_PER_CHUNK."""
    while chunk := list(islice(located_items, ITEMS_PER_CHUNK)):
        locations, items = zip(*chunk)
        yield list(locations), list(items)


# --- writing and reading the format --------------------------------------------------------------------------

class MMIndexedWriter:
    """Appends samples to PREFIX.bin; `finalize` writes PREFIX.idx."""

    def __init__(self, bin_path: str):
        self._bin = open(bin_path, "wb")
        self._samples: list[tuple] = []
        self._media: list[tuple] = []

    def _append(self, data: bytes) -> tuple[int, int]:
        offset = self._bin.tell()
        self._bin.write(data)
        self._bin.write(b"\0" * (-len(data) % ALIGNMENT))
        return offset, len(data)

    def add_sample(self, sample: MMSample) -> None:
        token_offset, _ = self._append(sample.tokens.astype(TOKEN_DTYPE, copy=False).tobytes())
        self._samples.append((token_offset, sample.tokens.size, len(self._media), len(sample.media)))
        for record in sample.media:
            kind = KINDS.index(record.kind)
            if isinstance(record.data, numpy.ndarray):
                dtype_code = next(code for code, dtype in ARRAY_DTYPES.items() if dtype == record.data.dtype)
                offset, nbytes = self._append(numpy.ascontiguousarray(record.data).tobytes())
                shape = (*record.data.shape, *[0] * (4 - record.data.ndim))
                self._media.append((kind, ARRAY, dtype_code, record.data.ndim, 0, record.position, offset, nbytes,
                                    shape))
            else:
                offset, nbytes = self._append(record.data)
                self._media.append((kind, RAW, 0, 0, 0, record.position, offset, nbytes, (0, 0, 0, 0)))

    def finalize(self, idx_path: str) -> None:
        self._bin.close()
        samples = numpy.array(self._samples, dtype=SAMPLE_DTYPE)
        media = numpy.array(self._media, dtype=MEDIA_DTYPE)
        with open(idx_path, "wb") as idx:
            idx.write(HEADER.pack(MAGIC, VERSION, 0, len(samples), len(media)))
            idx.write(samples.tobytes())
            idx.write(media.tobytes())

    def close(self) -> None:
        self._bin.close()


class MMIndexedDataset:
    """Random access to PREFIX.{bin,idx}: dataset[i] -> MMSample(tokens int32, [MediaRecord])."""

    def __init__(self, prefix: str):
        """Raises UserError when a file is missing, the .idx is not complete or the .bin is shorter
        than its index says."""
        self.prefix = prefix
        idx_path, bin_path = f"{prefix}.idx", f"{prefix}.bin"
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise UserError(f"multimodal dataset file not found: {path}")
        idx_size = os.path.getsize(idx_path)
        with open(idx_path, "rb") as idx:
            header = idx.read(HEADER.size)
        if not MAGIC.startswith(header[:len(MAGIC)]):
            text_index = header.startswith(INDEX_MAGIC)
            raise UserError(f"{idx_path} is not a multimodal index (no MMIDX header)" + (
                ": it is a text dataset (tools/preprocess_data.py); multimodal families read "
                "tools/preprocess_mm_data.py output" if text_index else ""))
        if len(header) < HEADER.size:
            raise UserError(f"{idx_path} is truncated: {idx_size} bytes, shorter than the {HEADER.size}-byte header")
        magic, version, _, num_samples, num_media = HEADER.unpack(header)
        if magic != MAGIC or version != VERSION:
            raise UserError(f"{idx_path} is not a multimodal index (version {VERSION})")
        expected = HEADER.size + num_samples * SAMPLE_DTYPE.itemsize + num_media * MEDIA_DTYPE.itemsize
        if idx_size != expected:
            state = "truncated" if idx_size < expected else "longer than its header describes"
            raise UserError(f"{idx_path} is {state}: {idx_size} bytes, its header ({num_samples} samples, "
                            f"{num_media} media) needs {expected}")
        self._samples = _map_array(idx_path, SAMPLE_DTYPE, HEADER.size, num_samples)
        self._media = _map_array(idx_path, MEDIA_DTYPE, HEADER.size + num_samples * SAMPLE_DTYPE.itemsize, num_media)
        needed = self._bin_bytes_needed()
        bin_size = os.path.getsize(bin_path)
        if bin_size < needed:
            raise UserError(f"{bin_path} is truncated: {bin_size} bytes, its index ({num_samples} samples, "
                            f"{num_media} media) needs {needed}")
        self._bin = _map_array(bin_path, numpy.dtype(numpy.uint8), 0, bin_size)

    def _bin_bytes_needed(self) -> int:
        token_ends = self._samples["token_offset"] + self._samples["token_count"] * TOKEN_DTYPE.itemsize
        media_ends = self._media["offset"] + self._media["nbytes"]
        return int(max(token_ends.max(initial=0), media_ends.max(initial=0)))

    def samples_holding(self, kind: str) -> numpy.ndarray:
        """Boolean per sample: it holds at least one `kind` record (read from the index alone)."""
        counts = self._samples["media_count"].astype(numpy.int64)
        owners = numpy.repeat(numpy.arange(len(self._samples)), counts)
        entries = numpy.repeat(self._samples["media_start"].astype(numpy.int64), counts) + (
            numpy.arange(counts.sum()) - numpy.repeat(numpy.cumsum(counts) - counts, counts))
        holding = numpy.zeros(len(self._samples), dtype=bool)
        holding[owners[self._media["kind"][entries] == KINDS.index(kind)]] = True
        return holding

    def max_token_id(self, chunk_samples: int = 1 << 16) -> int:
        """The largest token id of every sample (-1 when there is none), read in chunks of samples."""
        tokens = self._bin[:len(self._bin) // TOKEN_DTYPE.itemsize * TOKEN_DTYPE.itemsize].view(TOKEN_DTYPE)
        largest = -1
        for first in range(0, len(self._samples), chunk_samples):
            chunk = self._samples[first:first + chunk_samples]
            counts = chunk["token_count"].astype(numpy.int64)
            if not counts.sum():
                continue
            # every token position of the chunk: each sample's start repeated, plus its offsets 0..count-1
            starts = (chunk["token_offset"] // TOKEN_DTYPE.itemsize).astype(numpy.int64)
            within = numpy.arange(counts.sum()) - numpy.repeat(numpy.cumsum(counts) - counts, counts)
            largest = max(largest, int(tokens[numpy.repeat(starts, counts) + within].max()))
        return largest

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, index: int) -> MMSample:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        sample = self._samples[index]
        start = int(sample["token_offset"])
        tokens = self._bin[start:start + int(sample["token_count"]) * TOKEN_DTYPE.itemsize].view(TOKEN_DTYPE)
        first = int(sample["media_start"])
        entries = self._media[first:first + int(sample["media_count"])]
        return MMSample(tokens, [self._media_record(entry) for entry in entries])

    def num_tokens(self, index: int) -> int:
        return int(self._samples[index]["token_count"])

    def sample_headers(self) -> numpy.ndarray:
        """Every sample's index entry (SAMPLE_DTYPE: token_offset, token_count, media_start,
        media_count), read-only."""
        return self._samples

    def media_sizes(self, index: int) -> list[tuple[str, int, tuple[int, int]]]:
        """(kind, position, size) of each media record of sample `index`, read without decoding pixels
        or samples: images (height, width) from the file header, audio (frames, sample rate) from the
        WAV header. Audio stored as an array is taken to be 16 kHz."""
        sample = self._samples[index]
        first = int(sample["media_start"])
        return [(KINDS[entry["kind"]], int(entry["position"]), self._media_size(entry))
                for entry in self._media[first:first + int(sample["media_count"])]]

    def _media_size(self, entry: numpy.void) -> tuple[int, int]:
        kind = KINDS[entry["kind"]]
        if entry["encoding"] == ARRAY:
            first, second = int(entry["shape"][0]), int(entry["shape"][1])
            return (first, second) if kind == "image" else (first, 16000)
        data = io.BytesIO(self._bin[int(entry["offset"]):int(entry["offset"]) + int(entry["nbytes"])])
        if kind == "image":
            from PIL import Image

            with Image.open(data) as image:  # reads the header only
                return image.height, image.width
        with wave.open(data, "rb") as clip:
            return clip.getnframes(), clip.getframerate()

    def _media_record(self, entry: numpy.void) -> MediaRecord:
        data = self._bin[int(entry["offset"]):int(entry["offset"]) + int(entry["nbytes"])]
        if entry["encoding"] == ARRAY:
            data = data.view(ARRAY_DTYPES[int(entry["dtype"])]).reshape(tuple(entry["shape"][:entry["ndim"]]))
        else:
            data = data.tobytes()
        return MediaRecord(KINDS[entry["kind"]], int(entry["position"]), data)


def _map_array(path: str, dtype: numpy.dtype, offset: int, count: int) -> numpy.ndarray:
    if count == 0:  # numpy cannot map zero bytes
        return numpy.zeros(0, dtype)
    return numpy.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


# --- the whole run ----------------------------------------------------------------------------------------------

def preprocess_mm(
    input_paths: list[str],
    tokenizer_type: str,
    tokenizer_model: str,
    output_prefix: str,
    input_format: str = "jsonl",
    media_format: str = "raw",
    workers: int = 1,
    append_eod: bool = False,
    progress: bool = True,
) -> dict:
    """Write every readable sample of `input_paths` to `output_prefix`.{bin,idx}, in input order.

    Returns the summary: samples, tokens, images, audio, items, seconds, skipped (reason -> count),
    skipped_at (reason -> its first locations), output (the prefix). Raises UserError for a missing
    or unreadable input or tokenizer model, and when no sample would be written (nothing is then).
    """
    from tqdm import tqdm

    for path in input_paths:
        if not os.path.isfile(path):
            raise UserError(f"input file not found: {path}")
    if input_format not in INPUT_FORMATS or media_format not in MEDIA_FORMATS:
        raise UserError(f"input format must be one of {INPUT_FORMATS}, media format one of {MEDIA_FORMATS}")
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}")
    encoder = SampleEncoder(build_tokenizer(tokenizer_type, tokenizer_model), append_eod, media_format)
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    # Written under temporary names and renamed at the end: readers never see a half-written dataset.
    partial_bin, partial_idx = f"{output_prefix}.bin.partial", f"{output_prefix}.idx.partial"
    writer = MMIndexedWriter(partial_bin)
    counts, skipped, skipped_at = Counter(), Counter(), {}
    start = time.perf_counter()
    try:
        init_args = (tokenizer_type, tokenizer_model, append_eod, media_format)
        items = read_items(input_paths, input_format)
        with tqdm(unit="sample", desc="preprocess", disable=not progress) as bar:
            for locations, results in encode_in_order(_located_chunks(items), encoder, workers, _sample_encoder,
                                                      init_args):
                for location, result in zip(locations, results):
                    counts["items"] += 1
                    if isinstance(result, str):
                        skipped[result] += 1
                        first = skipped_at.setdefault(result, [])
                        if len(first) < REPORTED_LOCATIONS:
                            first.append(location)
                        continue
                    writer.add_sample(result)
                    counts["samples"] += 1
                    counts["tokens"] += result.tokens.size
                    for record in result.media:
                        counts[record.kind] += 1
                bar.update(len(results))
        if not counts["samples"]:
            reasons = skip_counts({reason: skipped[reason] for reason in SKIP_REASONS if skipped[reason]},
                                  skipped_at)
            why = f"{counts['items']} inputs read, skipped: {', '.join(reasons)}" if reasons else "no input found"
            raise UserError(f"{', '.join(input_paths)}: no sample written ({why})")
        writer.finalize(partial_idx)
        os.replace(partial_bin, f"{output_prefix}.bin")
        os.replace(partial_idx, f"{output_prefix}.idx")
    finally:
        writer.close()
        for partial in (partial_bin, partial_idx):
            if os.path.exists(partial):
                os.remove(partial)
    return {
        **{key: counts[key] for key in ("samples", "tokens", "image", "audio", "items")},
        "seconds": time.perf_counter() - start,
        "skipped": {reason: skipped[reason] for reason in SKIP_REASONS if skipped[reason]},
        "skipped_at": {reason: skipped_at[reason] for reason in SKIP_REASONS if skipped[reason]},
        "output": output_prefix,
    }


def format_summary(summary: dict) -> str:
    seconds = max(summary["seconds"], 1e-9)
    lines = [
        f"samples written: {summary['samples']}  tokens: {summary['tokens']}  images: {summary['image']}  "
        f"audio: {summary['audio']}  inputs read: {summary['items']}  ({summary['seconds']:.2f} s, "
        f"{summary['samples'] / seconds:.0f} samples/s)"
    ]
    lines += format_skipped(summary["skipped"], summary["skipped_at"], SKIP_REASONS)
    lines.append(f"output: {summary['output']}.bin / {summary['output']}.idx")
    return "\n".join(lines)
