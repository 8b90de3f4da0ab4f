"""Multimodal training sequences from mm_indexed datasets (data/mm_indexed.py): media decoded and
processed by the model's processors, placeholders expanded, several samples packed into each
fixed-length sequence, sources blended by weight and split into train/valid/test.

A sample expands to its text with `num_placeholders` copies of the modality's placeholder id inserted
where each media record sits; labels are the next token of the same sample, and the loss mask is 0
where the label is a placeholder, on each sample's last token and on padding. Packing is first-fit
in stream order over a window of open sequences, planned from token counts and media sizes read from
the index headers (nothing is decoded to plan): dataset[i] is a pure function of i, so the loop
resumes from a consumed-sample count. Position ids restart at every packed sample (M-RoPE per sample
when the model supplies `position_ids_fn`); attention is not masked between packed samples, as in
megatron-core's GPTDataset without reset_attention_mask.

Building checks every source first: complete files, at least one sample, every token id below
cfg.model.vocab_size (data/vocab_check.py). Samples holding media the model has no processor for
(audio for an image-only model) are left out and counted; a source holding nothing else is refused.
"""

from __future__ import annotations

import io
import logging
import wave
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Protocol, Sequence, Union

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)

from megatron_mm.data.gpt_data import parse_blend
from megatron_mm.data.mm_indexed import KINDS, MediaRecord, MMIndexedDataset, MMSample
from megatron_mm.data.vocab_check import cached_max_token_id, check_vocabulary, rank_zero_first
from megatron_mm.errors import UserError

logger = logging.getLogger(__name__)

AUDIO_SAMPLE_RATE = 16000
# Open sequences a sample may still join; older ones are final. More packs tighter, plans slower.
DEFAULT_PACKING_WINDOW = 16
SPLIT_NAMES = ("train", "valid", "test")
TEXT_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
# Blank items run through each processor once, to learn the keys and shapes of "no media of this kind".
BLANK_IMAGE_SIZE = (64, 64)
BLANK_AUDIO_SAMPLES = AUDIO_SAMPLE_RATE

PositionIdsFn = Callable[[torch.Tensor, dict], torch.Tensor]


class MediaProcessor(Protocol):
    """One decoded media item -> (encoder inputs with a leading item dimension, placeholder count).

    Items are uint8 HxWx3 RGB images or float32 mono 16 kHz waveforms. A processor may also define
    `num_placeholders(*size)` (images: height, width; audio: number of samples) so that packing is
    planned without processing anything; otherwise the count is measured once per size on a blank
    item, so it must depend on the item's size only."""

    modality: str  # "image" or "audio"
    placeholder_id: int

    def __call__(self, item: numpy.ndarray) -> tuple[dict[str, torch.Tensor], int]: ...


# --- decoding media records ----------------------------------------------------------------------------------

def audio_length(frames: int, sample_rate: int) -> int:
    """Samples of a clip once resampled to 16 kHz."""
    return round(frames * AUDIO_SAMPLE_RATE / sample_rate)


def item_size(kind: str, stored_size: tuple[int, int]) -> tuple[int, ...]:
    """The processor's view of a record's size (mm_indexed.media_sizes): images (height, width),
    audio (samples at 16 kHz,)."""
    return tuple(stored_size) if kind == "image" else (audio_length(*stored_size),)


def decode_media(record: MediaRecord) -> numpy.ndarray:
    """A record as its processor takes it: uint8 HxWx3 image or float32 mono 16 kHz waveform."""
    if record.kind == "image":
        if isinstance(record.data, numpy.ndarray):
            return numpy.array(record.data)  # stored pixels; a copy, the index is mapped read-only
        from PIL import Image

        with Image.open(io.BytesIO(record.data)) as image:
            return numpy.asarray(image.convert("RGB"))
    if isinstance(record.data, numpy.ndarray):
        data = record.data
        waveform = data.astype(numpy.float32) / 32768 if data.dtype.kind == "i" else data.astype(numpy.float32)
        return waveform.reshape(len(data), -1).mean(axis=1)
    with wave.open(io.BytesIO(record.data), "rb") as clip:
        width, channels, rate = clip.getsampwidth(), clip.getnchannels(), clip.getframerate()
        frames = clip.readframes(clip.getnframes())
    if width not in (1, 2, 4):
        raise ValueError(f"unsupported WAV sample width: {width} bytes")
    samples = numpy.frombuffer(frames, {1: "u1", 2: "<i2", 4: "<i4"}[width]).astype(numpy.float32)
    if width == 1:  # 8-bit WAV is unsigned
        samples -= 128
    waveform = (samples / 2.0 ** (8 * width - 1)).reshape(-1, channels).mean(axis=1)
    return _resample(waveform, rate)


def _resample(waveform: numpy.ndarray, rate: int) -> numpy.ndarray:
    """Linear interpolation to 16 kHz (no anti-alias filter: resample offline where quality matters)."""
    if rate == AUDIO_SAMPLE_RATE:
        return waveform
    length = audio_length(len(waveform), rate)
    times = numpy.arange(length) * (rate / AUDIO_SAMPLE_RATE)
    return numpy.interp(times, numpy.arange(len(waveform)), waveform).astype(numpy.float32)


def _blank_item(kind: str, size: tuple[int, ...]) -> numpy.ndarray:
    return numpy.zeros((*size, 3), numpy.uint8) if kind == "image" else numpy.zeros(size, numpy.float32)


class PlaceholderCounter:
    """Placeholder tokens of a media item from its size, as its processor will produce them."""

    def __init__(self, processors: Mapping[str, MediaProcessor]):
        self.processors = processors
        self._counts: dict[tuple[str, tuple[int, ...]], int] = {}

    def __call__(self, kind: str, size: tuple[int, ...]) -> int:
        if (kind, size) not in self._counts:
            processor = _processor_for(self.processors, kind)
            if hasattr(processor, "num_placeholders"):
                count = processor.num_placeholders(*size)
            else:
                count = processor(_blank_item(kind, size))[1]
            self._counts[kind, size] = int(count)
        return self._counts[kind, size]


def _processor_for(processors: Mapping[str, MediaProcessor], kind: str) -> MediaProcessor:
    if kind not in processors:
        raise ValueError(f"the data holds {kind} records but no {kind} processor was given")
    return processors[kind]


# --- one sample alone ---------------------------------------------------------------------------------------

def expand_sample(
    sample: MMSample,
    processors: Mapping[str, MediaProcessor],
    placeholder_ids: Mapping[str, int],
    position_ids_fn: Optional[PositionIdsFn] = None,
    max_length: Optional[int] = None,
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """One sample alone: `tokens` [S] with expanded placeholders, `labels`, `loss_mask`,
    `position_ids` ([S] or [3, S]) and the processors' media tensors (items concatenated per key).

    max_length: keep only the first tokens (callers never cut through placeholders).
    """
    text = torch.from_numpy(sample.tokens.astype(numpy.int64))
    all_ids = torch.tensor(sorted(set(placeholder_ids.values())))
    if torch.isin(text, all_ids).any():
        raise ValueError(f"the text holds placeholder ids {all_ids.tolist()}: the model would take them for media")
    pieces, media, cursor = [], {}, 0
    for record in sample.media:
        inputs, count = _processor_for(processors, record.kind)(decode_media(record))
        pieces += [text[cursor:record.position], torch.full((count,), placeholder_ids[record.kind])]
        cursor = record.position
        for key, value in inputs.items():
            media.setdefault(key, []).append(torch.as_tensor(value))
    pieces.append(text[cursor:])
    tokens = torch.cat(pieces)[:max_length]
    media = {key: torch.cat(values) for key, values in media.items()}

    labels = torch.cat([tokens[1:], tokens.new_full((1,), pad_token_id)])
    loss_mask = (~torch.isin(labels, all_ids)).float()
    loss_mask[-1] = 0.0  # the sample's last token has no next token
    position_ids = position_ids_fn(tokens, media) if position_ids_fn else torch.arange(len(tokens))
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids, **media}


# --- sources, splits and the blended stream -----------------------------------------------------------------

@dataclass
class SourceSplit:
    """Samples [begin, end) of one indexed dataset: its share of a train/valid/test split; when
    `kept` is given, only those sample indices of the range."""

    dataset: MMIndexedDataset
    begin: int
    end: int
    kept: Optional[numpy.ndarray] = None

    def __len__(self) -> int:
        return self.end - self.begin if self.kept is None else len(self.kept)

    def sample(self, offset: int) -> int:
        """The dataset index of the split's `offset`-th sample."""
        return self.begin + offset if self.kept is None else int(self.kept[offset])

    def samples(self, offsets: numpy.ndarray) -> numpy.ndarray:
        """`sample` of each of `offsets`."""
        return self.begin + offsets if self.kept is None else self.kept[offsets].astype(numpy.int64)


def split_bounds(num_samples: int, split: str) -> list[Optional[tuple[int, int]]]:
    """[begin, end) of each of train/valid/test within `num_samples`, as megatron-core splits documents."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    return [None if part is None else (int(round(part[0] * num_samples)), int(round(part[1] * num_samples)))
            for part in matrix]


def blending_indices(weights: Sequence[float], size: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    """megatron-core's BlendedDataset order: (source of each stream position, how many samples that
    source gave before it). Every prefix holds each source within one sample of its weight."""
    from megatron.core.datasets import helpers

    normalized = numpy.asarray(weights, dtype=numpy.float64) / sum(weights)
    sources = numpy.zeros(size, dtype=numpy.int16)
    source_positions = numpy.zeros(size, dtype=numpy.int64)
    helpers.build_blending_indices(sources, source_positions, normalized, len(weights), size, False)
    return sources, source_positions


class BlendedStream:
    """Position i of an endless stream -> (source, sample index in the source's dataset). Sources
    follow `blending_indices`; each walks its split in a fresh seeded permutation every epoch."""

    def __init__(self, splits: Sequence[SourceSplit], weights: Sequence[float], seed: int, split_index: int = 0):
        self.splits, self.weights = list(splits), list(weights)
        self.seed, self.split_index = seed, split_index
        self._sources = self._source_positions = numpy.zeros(0, dtype=numpy.int64)
        self._permutations: dict[tuple[int, int], numpy.ndarray] = {}

    def __getitem__(self, position: int) -> tuple[int, int]:
        sources, samples = self.take(position, 1)
        return int(sources[0]), int(samples[0])

    def take(self, start: int, count: int) -> tuple[numpy.ndarray, numpy.ndarray]:
        """(sources, sample indices) of positions [start, start + count), as arrays."""
        end = start + count
        if end > len(self._sources):  # grow geometrically; the order is prefix-stable
            self._sources, self._source_positions = blending_indices(self.weights, max(1024, 2 * end))
        sources = self._sources[start:end].astype(numpy.int64)
        source_positions = self._source_positions[start:end]
        samples = numpy.empty(count, dtype=numpy.int64)
        for source in numpy.unique(sources).tolist():
            at_source = numpy.flatnonzero(sources == source)
            split = self.splits[source]
            epochs, offsets = numpy.divmod(source_positions[at_source], len(split))
            for epoch in numpy.unique(epochs).tolist():
                in_epoch = epochs == epoch
                samples[at_source[in_epoch]] = split.samples(self._permutation(source, epoch)[offsets[in_epoch]])
        return sources, samples

    def _permutation(self, source: int, epoch: int) -> numpy.ndarray:
        if (source, epoch) not in self._permutations:
            rng = numpy.random.default_rng([self.seed, self.split_index, source, epoch])
            self._permutations[source, epoch] = rng.permutation(len(self.splits[source]))
        return self._permutations[source, epoch]


# --- packing ------------------------------------------------------------------------------------------------

@dataclass
class PackingPlan:
    """Sequence i holds members offsets[i]:offsets[i+1], each a stream position, its (source,
    sample) and its expanded length (after truncation)."""

    offsets: numpy.ndarray
    stream_positions: numpy.ndarray
    sources: numpy.ndarray
    samples: numpy.ndarray
    lengths: numpy.ndarray
    dropped_positions: numpy.ndarray  # stream positions of samples whose media do not fit
    # sequences, samples, tokens (not padding), fill, truncated (samples cut in their text),
    # truncated_tokens, dropped and stream_samples_read (the samples the plan looked at)
    stats: dict


class SampleLayouts:
    """(expanded length, end of the last placeholder) of each sample, from the index headers; text-only
    samples in one array operation, those with media once each."""

    def __init__(self, splits: Sequence[SourceSplit], counter: PlaceholderCounter):
        self.splits, self.counter = splits, counter
        self._lengths: dict[int, numpy.ndarray] = {}  # per source, by dataset index; -1 until read
        self._media_ends: dict[int, numpy.ndarray] = {}

    def __call__(self, source: int, sample: int) -> tuple[int, int]:
        lengths, media_ends = self.take(numpy.array([source]), numpy.array([sample]))
        return int(lengths[0]), int(media_ends[0])

    def take(self, sources: numpy.ndarray, samples: numpy.ndarray) -> tuple[numpy.ndarray, numpy.ndarray]:
        lengths = numpy.empty(len(samples), dtype=numpy.int64)
        media_ends = numpy.empty(len(samples), dtype=numpy.int64)
        for source in numpy.unique(sources).tolist():
            at_source = sources == source
            source_lengths, source_media_ends = self._of_source(source, samples[at_source])
            lengths[at_source], media_ends[at_source] = source_lengths, source_media_ends
        return lengths, media_ends

    def _of_source(self, source: int, samples: numpy.ndarray) -> tuple[numpy.ndarray, numpy.ndarray]:
        dataset = self.splits[source].dataset
        if source not in self._lengths:
            headers = dataset.sample_headers()
            self._lengths[source] = numpy.where(headers["media_count"] == 0, headers["token_count"], -1).astype(numpy.int64)
            self._media_ends[source] = numpy.zeros(len(headers), dtype=numpy.int64)
        lengths, media_ends = self._lengths[source], self._media_ends[source]
        for sample in numpy.unique(samples[lengths[samples] < 0]).tolist():
            placeholders, media_end = 0, 0
            for kind, position, size in dataset.media_sizes(sample):
                placeholders += self.counter(kind, item_size(kind, size))
                media_end = position + placeholders  # the text before it and every placeholder so far
            lengths[sample], media_ends[sample] = dataset.num_tokens(sample) + placeholders, media_end
        return lengths[samples], media_ends[samples]


def plan_packing(stream: BlendedStream, layouts: SampleLayouts, seq_length: int, num_sequences: int,
                 window: int = DEFAULT_PACKING_WINDOW) -> PackingPlan:
    """First-fit in stream order: each sample joins the oldest of the last `window` open sequences
    with room for it, else opens one. A sample longer than `seq_length` loses text from its end when
    all its placeholders fit, and is dropped otherwise.

    Stream positions and sample layouts are looked up in array blocks; only the first-fit choice,
    which depends on every earlier one, runs per sample, on plain integers."""
    open_bins: list[list] = []  # [free tokens, stream positions of its members]
    closed_members: list[list[int]] = []
    dropped: list[int] = []
    # Every sample of every source, once, without one kept: nothing would ever fit.
    give_up_after = sum(len(split) for split in stream.splits)
    block = max(1024, 4 * window)
    position = 0
    while len(closed_members) < num_sequences:
        sources, samples = stream.take(position, block)
        lengths, media_ends = layouts.take(sources, samples)
        fits = (media_ends <= seq_length).tolist()
        kept_lengths = numpy.minimum(lengths, seq_length).tolist()
        for fit, kept in zip(fits, kept_lengths):
            if len(closed_members) == num_sequences:
                break
            if not fit:
                dropped.append(position)
                position += 1
                if not closed_members and not open_bins and len(dropped) >= give_up_after:
                    raise UserError(f"no sample's media fit in data.seq_length={seq_length}")
                continue
            target = next((b for b in open_bins if b[0] >= kept), None)
            if target is None:
                target = [seq_length, []]
                open_bins.append(target)
                if len(open_bins) > window:
                    closed_members.append(open_bins.pop(0)[1])
            target[0] -= kept
            target[1].append(position)
            position += 1
    member_positions = numpy.array([p for members in closed_members for p in members], dtype=numpy.int64)
    offsets = numpy.cumsum([0] + [len(members) for members in closed_members])
    sources, samples = stream.take(0, position)
    sources, samples = sources[member_positions], samples[member_positions]
    lengths, _ = layouts.take(sources, samples)
    kept = numpy.minimum(lengths, seq_length)
    tokens, cut = int(kept.sum()), lengths - kept
    stats = dict(sequences=num_sequences, samples=len(member_positions), tokens=tokens,
                 fill=tokens / max(1, num_sequences * seq_length), truncated=int((cut > 0).sum()),
                 truncated_tokens=int(cut.sum()), dropped=len(dropped), stream_samples_read=position)
    return PackingPlan(offsets, member_positions, sources, samples, kept, numpy.array(dropped, dtype=numpy.int64),
                       stats)


def format_packing_stats(name: str, stats: dict) -> str:
    line = (f"{name}: {stats['sequences']} sequences of {stats['samples']} samples, "
            f"{100 * stats['fill']:.1f}% tokens (rest padding); {stats['truncated']} samples cut in their "
            f"text ({stats['truncated_tokens']} tokens), {stats['dropped']} dropped: media beyond the "
            f"sequence length")
    for kind, count in stats.get("left_out", {}).items():
        line += f"; {count} samples with {kind} left out: the model has no {kind} processor"
    return line


class PackedMMDataset:
    """dataset[i] -> one training sequence: the text keys (TEXT_KEYS, seq_length long) and every
    processor's media keys (items of all its packed samples, in order; empty when it has none)."""

    def __init__(
        self,
        splits: Sequence[SourceSplit],
        weights: Sequence[float],
        processors: Mapping[str, MediaProcessor],
        placeholder_ids: Mapping[str, int],
        seq_length: int,
        num_samples: int,
        seed: int,
        position_ids_fn: Optional[PositionIdsFn] = None,
        pad_token_id: int = 0,
        packing_window: int = DEFAULT_PACKING_WINDOW,
        split_index: int = 0,
    ):
        self.splits, self.processors, self.placeholder_ids = list(splits), dict(processors), dict(placeholder_ids)
        self.seq_length, self.position_ids_fn = seq_length, position_ids_fn
        self.pad_token_id = pad_token_id
        self.stream = BlendedStream(self.splits, weights, seed, split_index)
        layouts = SampleLayouts(self.splits, PlaceholderCounter(self.processors))
        self.plan = plan_packing(self.stream, layouts, seq_length, num_samples, packing_window)
        self.empty_media = {}
        for kind, processor in self.processors.items():
            blank = BLANK_IMAGE_SIZE if kind == "image" else (BLANK_AUDIO_SAMPLES,)
            self.empty_media.update({key: torch.as_tensor(value)[:0]
                                     for key, value in processor(_blank_item(kind, blank))[0].items()})

    @property
    def stats(self) -> dict:
        return self.plan.stats

    def __len__(self) -> int:
        return len(self.plan.offsets) - 1

    def members(self, index: int) -> list[tuple[int, int, int]]:
        """(source, sample index in its dataset, expanded length) of each sample in sequence `index`."""
        span = slice(self.plan.offsets[index], self.plan.offsets[index + 1])
        return list(zip(self.plan.sources[span].tolist(), self.plan.samples[span].tolist(),
                        self.plan.lengths[span].tolist()))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} out of range for {len(self)}")
        parts = []
        for source, sample, length in self.members(index):
            expanded = expand_sample(self.splits[source].dataset[sample], self.processors, self.placeholder_ids,
                                     self.position_ids_fn, length, self.pad_token_id)
            if len(expanded["tokens"]) != length:
                raise ValueError(f"sample {sample} of source {source} expands to {len(expanded['tokens'])} tokens, "
                                 f"planned {length}: a processor's placeholder count depends on more than the size")
            parts.append(expanded)
        padding = self.seq_length - sum(len(part["tokens"]) for part in parts)
        pad_positions = torch.arange(padding).expand(*parts[0]["position_ids"].shape[:-1], padding)
        sequence = {
            "tokens": torch.cat([p["tokens"] for p in parts] + [torch.full((padding,), self.pad_token_id)]),
            "labels": torch.cat([p["labels"] for p in parts] + [torch.full((padding,), self.pad_token_id)]),
            "loss_mask": torch.cat([p["loss_mask"] for p in parts] + [torch.zeros(padding)]),
            "position_ids": torch.cat([p["position_ids"] for p in parts] + [pad_positions], dim=-1),
        }
        for key, empty in self.empty_media.items():
            sequence[key] = torch.cat([empty] + [p[key] for p in parts if key in p])
        return sequence


# --- the entry of the training loop -------------------------------------------------------------------------

def build_mm_datasets(
    cfg,
    processors: Union[Mapping[str, MediaProcessor], Iterable[MediaProcessor]],
    num_samples: Sequence[int],
    position_ids_fn: Optional[PositionIdsFn] = None,
    *,
    pad_token_id: int = 0,
    packing_window: int = DEFAULT_PACKING_WINDOW,
    families_taking: Optional[Callable[[str], Sequence[str]]] = None,
) -> tuple[Optional[PackedMMDataset], ...]:
    """(train, valid, test) packed datasets of `num_samples` sequences each from cfg.data.blend
    (mm_indexed prefixes, optionally weighted), cfg.data.split, cfg.data.seq_length, cfg.train.seed.
    A split with no share in cfg.data.split, or no samples asked, is None.

    processors: modality -> processor (or processors with a `modality`); placeholder ids are the
    processors' `placeholder_id`, else cfg.model.placeholder_ids(). Unweighted blends draw from the
    sources in proportion to their sizes. Samples holding a modality without a processor are left
    out (stats["left_out"]: modality -> count); families_taking(modality) names the model families
    that take it, for the error when a source holds nothing else. Every rank must call this under
    torch.distributed (the sources are checked on rank 0 first).
    """
    if len(num_samples) != 3:
        raise ValueError(f"num_samples must be (train, valid, test), got {num_samples}")
    if not isinstance(processors, Mapping):
        processors = {processor.modality: processor for processor in processors}
    placeholder_ids = {}
    for kind, processor in processors.items():
        token_id = getattr(processor, "placeholder_id", None)
        placeholder_ids[kind] = token_id if token_id is not None else cfg.model.placeholder_ids()[kind]
    if not cfg.data.blend:
        raise UserError("no data: data.blend must list mm_indexed dataset prefixes")
    prefixes, weights = parse_blend(cfg.data.blend)
    datasets = [MMIndexedDataset(prefix) for prefix in prefixes]
    rank_zero_first(lambda: check_mm_datasets(datasets, getattr(cfg.model, "vocab_size", None)))
    unsupported = {kind: [dataset.samples_holding(kind) for dataset in datasets]
                   for kind in KINDS if kind not in processors}
    kept = [numpy.ones(len(dataset), dtype=bool) for dataset in datasets]
    for kind, holding in unsupported.items():
        for index, dataset in enumerate(datasets):
            kept[index] &= ~holding[index]
            if not kept[index].any():
                raise UserError(_nothing_usable(dataset.prefix, kind, getattr(cfg.model, "family", None),
                                                families_taking))

    built = []
    for split_index, (name, wanted) in enumerate(zip(SPLIT_NAMES, num_samples)):
        bounds = [split_bounds(len(dataset), cfg.data.split)[split_index] for dataset in datasets]
        if not wanted or bounds[0] is None:
            built.append(None)
            continue
        sources = []
        for dataset, (begin, end), weight, keep in zip(datasets, bounds, weights or [None] * len(datasets), kept):
            split = SourceSplit(dataset, begin, end, begin + numpy.flatnonzero(keep[begin:end]) if unsupported
                                else None)
            if len(split):
                sources.append((split, weight))
        if not sources:
            raise UserError(f"the {name} split ({cfg.data.split}) holds no sample of {prefixes}")
        splits = [split for split, _ in sources]
        split_weights = [weight if weights else len(split) for split, weight in sources]
        dataset = PackedMMDataset(splits, split_weights, processors, placeholder_ids, cfg.data.seq_length, wanted,
                                  cfg.train.seed, position_ids_fn, pad_token_id, packing_window,
                                  split_index)
        left_out = {kind: sum(int(holding[index][begin:end].sum()) for index, (begin, end) in enumerate(bounds))
                    for kind, holding in unsupported.items()}
        dataset.stats["left_out"] = {kind: count for kind, count in left_out.items() if count}
        logger.info(format_packing_stats(name, dataset.stats))
        built.append(dataset)
    return tuple(built)


def check_mm_datasets(datasets: Sequence[MMIndexedDataset], vocab_size: Optional[int]) -> None:
    """Each source holds a sample, and every token id is below vocab_size (when given)."""
    for dataset in datasets:
        if not len(dataset):
            raise UserError(f"{dataset.prefix}.idx holds no sample: an empty dataset cannot be trained on")
        check_vocabulary(dataset.prefix, cached_max_token_id(dataset.prefix, dataset.max_token_id), vocab_size)


def _nothing_usable(prefix: str, kind: str, family: Optional[str],
                    families_taking: Optional[Callable[[str], Sequence[str]]]) -> str:
    model = f"model.family={family}" if family else "the model"
    takers = f" (families that take {kind}: {', '.join(families_taking(kind))})" if families_taking else ""
    return (f"{prefix} holds only samples with {kind}, and {model} has no {kind} encoder{takers}: "
            f"leave {prefix} out of data.blend, or train a family that takes {kind} on it")
