"""The packed multimodal plan built from array lookups (mm_training.plan_packing) equals the
per-sample loop it replaced, kept below as the reference: same sequences, members, lengths, drops
and statistics, for blends with kept subsets, epochs wrapping, truncation and dropped samples."""

import math

import numpy
import pytest

from megatron_mm.data import mm_training
from megatron_mm.data.mm_indexed import SAMPLE_DTYPE
from megatron_mm.data.mm_training import (BlendedStream, PlaceholderCounter, SampleLayouts, SourceSplit,
                                          item_size, plan_packing)
from megatron_mm.errors import UserError


class HeaderOnlyDataset:
    """What planning reads of an mm_indexed dataset: token counts and media sizes per sample."""

    def __init__(self, num_samples: int, seed: int, media_share: float):
        rng = numpy.random.default_rng(seed)
        self.headers = numpy.zeros(num_samples, dtype=SAMPLE_DTYPE)
        self.headers["token_count"] = rng.integers(1, 90, num_samples)
        self.media = []
        for index in range(num_samples):
            count = int(rng.integers(1, 3)) if rng.random() < media_share else 0
            positions = sorted(rng.integers(0, self.headers["token_count"][index] + 1, count).tolist())
            self.media.append([("image", position, (int(rng.integers(8, 90)), int(rng.integers(8, 90))))
                               for position in positions])
            self.headers["media_count"][index] = count

    def __len__(self):
        return len(self.headers)

    def num_tokens(self, index):
        return int(self.headers[index]["token_count"])

    def media_sizes(self, index):
        return self.media[index]

    def sample_headers(self):
        return self.headers


class PatchCounter:
    modality = "image"

    def __call__(self, image):
        raise AssertionError("planning decodes nothing")

    def num_placeholders(self, height, width):
        return math.ceil(height / 16) * math.ceil(width / 16)


# --- the reference: the per-sample loop -------------------------------------------------------------------

def reference_stream_item(stream: BlendedStream, position: int) -> tuple[int, int]:
    if position >= len(stream._sources):
        stream._sources, stream._source_positions = mm_training.blending_indices(stream.weights,
                                                                                 max(1024, 2 * position))
    source = int(stream._sources[position])
    split = stream.splits[source]
    epoch, offset = divmod(int(stream._source_positions[position]), len(split))
    return source, split.sample(int(stream._permutation(source, epoch)[offset]))


class ReferenceLayouts:
    def __init__(self, splits, counter):
        self.splits, self.counter = splits, counter
        self._cache = {}

    def __call__(self, source, sample):
        if (source, sample) not in self._cache:
            dataset = self.splits[source].dataset
            placeholders, media_end = 0, 0
            for kind, position, size in dataset.media_sizes(sample):
                placeholders += self.counter(kind, item_size(kind, size))
                media_end = position + placeholders
            self._cache[source, sample] = (dataset.num_tokens(sample) + placeholders, media_end)
        return self._cache[source, sample]


def reference_plan(stream, layouts, seq_length, num_sequences, window):
    open_bins, closed, dropped = [], [], []
    give_up_after = sum(len(split) for split in stream.splits)
    position = 0
    while len(closed) < num_sequences:
        source, sample = reference_stream_item(stream, position)
        length, media_end = layouts(source, sample)
        if media_end > seq_length:
            dropped.append(position)
            position += 1
            if not closed and not open_bins and len(dropped) >= give_up_after:
                raise UserError(f"no sample's media fit in data.seq_length={seq_length}")
            continue
        kept = min(length, seq_length)
        target = next((b for b in open_bins if b[0] >= kept), None)
        if target is None:
            target = [seq_length, []]
            open_bins.append(target)
            if len(open_bins) > window:
                closed.append(open_bins.pop(0))
        target[0] -= kept
        target[1].append((position, source, sample, kept, length))
        position += 1
    members = numpy.array([m for _, bin_members in closed for m in bin_members], dtype=numpy.int64).reshape(-1, 5)
    offsets = numpy.cumsum([0] + [len(bin_members) for _, bin_members in closed])
    tokens, cut = int(members[:, 3].sum()), members[:, 4] - members[:, 3]
    stats = dict(sequences=num_sequences, samples=len(members), tokens=tokens,
                 fill=tokens / max(1, num_sequences * seq_length), truncated=int((cut > 0).sum()),
                 truncated_tokens=int(cut.sum()), dropped=len(dropped), stream_samples_read=position)
    return offsets, members, numpy.array(dropped, dtype=numpy.int64), stats


def splits_of(sizes, media_share, kept_every):
    splits = []
    for index, size in enumerate(sizes):
        dataset = HeaderOnlyDataset(size, seed=index, media_share=media_share)
        kept = numpy.arange(1, size, kept_every, dtype=numpy.int64) if kept_every else None
        splits.append(SourceSplit(dataset, 1, size - 1, kept))
    return splits


@pytest.mark.parametrize("sizes, weights, seq_length, window, num_sequences, media_share, kept_every", [
    ((50,), (1.0,), 128, 16, 300, 0.5, None),  # a few epochs of one source
    ((40, 200, 7), (0.5, 0.3, 0.2), 96, 4, 400, 0.7, None),  # truncation, drops, a tiny source
    ((60, 30), (1.0, 3.0), 256, 1, 250, 0.3, 3),  # kept subsets, a window of one
    ((300,), (1.0,), 64, 16, 1500, 0.0, None),  # text only, more positions than one block
])
def test_array_plan_equals_the_per_sample_loop(sizes, weights, seq_length, window, num_sequences, media_share,
                                               kept_every):
    counter = PlaceholderCounter({"image": PatchCounter()})
    splits = splits_of(sizes, media_share, kept_every)
    plan = plan_packing(BlendedStream(splits, weights, seed=7, split_index=1), SampleLayouts(splits, counter),
                        seq_length, num_sequences, window)
    offsets, members, dropped, stats = reference_plan(BlendedStream(splits, weights, seed=7, split_index=1),
                                                      ReferenceLayouts(splits, counter), seq_length,
                                                      num_sequences, window)
    numpy.testing.assert_array_equal(plan.offsets, offsets)
    numpy.testing.assert_array_equal(plan.stream_positions, members[:, 0])
    numpy.testing.assert_array_equal(plan.sources, members[:, 1])
    numpy.testing.assert_array_equal(plan.samples, members[:, 2])
    numpy.testing.assert_array_equal(plan.lengths, members[:, 3])
    numpy.testing.assert_array_equal(plan.dropped_positions, dropped)
    assert plan.stats == stats
    assert stats["dropped"] > 0 or seq_length > 96 or not media_share  # drops run in the tight case


def test_stream_lookup_in_blocks_equals_one_at_a_time():
    splits = splits_of((40, 200, 7), 0.5, None)
    blocks, single = BlendedStream(splits, (0.5, 0.3, 0.2), 3), BlendedStream(splits, (0.5, 0.3, 0.2), 3)
    sources, samples = blocks.take(5, 3000)
    assert list(zip(sources.tolist(), samples.tolist())) == [reference_stream_item(single, p)
                                                             for p in range(5, 3005)]


def test_nothing_fits_is_refused_as_before():
    counter = PlaceholderCounter({"image": PatchCounter()})
    splits = splits_of((20,), 1.0, None)
    dataset = splits[0].dataset
    dataset.media = [[("image", 0, (90, 90))] for _ in dataset.media]  # 36 placeholders each
    dataset.headers["media_count"] = 1
    with pytest.raises(UserError, match="no sample's media fit in data.seq_length=16"):
        plan_packing(BlendedStream(splits, (1.0,), 0), SampleLayouts(splits, counter), 16, 10, 4)
