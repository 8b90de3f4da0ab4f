"""MicroBatches: the read-ahead thread hands out what a sequential read gives, in the same order;
virtual-pipeline chunks replay micro-batches read once; the tensor-parallel broadcast delivers
exactly what a local read gives, variable media shapes included."""

import gc
import os
import threading

import pytest
import torch
import torch.multiprocessing as mp

from megatron_mm.training.batches import MicroBatches, TensorParallelBroadcast, collate_micro_batch

SEQ = 8


class CountingDataset:
    """Text samples plus an image tensor whose size varies with the index; counts reads."""

    def __init__(self, size: int = 37, fail_at: int | None = None):
        self.size, self.fail_at, self.reads = size, fail_at, 0

    def __len__(self):
        return self.size

    def __getitem__(self, index: int) -> dict:
        if index == self.fail_at:
            raise ValueError(f"sample {index} is damaged")
        self.reads += 1
        gen = torch.Generator().manual_seed(index)
        return {
            "tokens": torch.randint(0, 100, (SEQ,), generator=gen),
            "labels": torch.randint(0, 100, (SEQ,), generator=gen),
            "loss_mask": torch.rand(SEQ, generator=gen),
            "position_ids": torch.arange(SEQ),
            "pixel_values": torch.rand(1 + index % 2, 3, 4, generator=gen),  # items per sample vary
            "image_flags": torch.tensor([index % 2 == 0]),
        }


def assert_same_batches(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def read(batches, count: int) -> list:
    return [next(batches) for _ in range(count)]


@pytest.mark.parametrize("dp_rank, dp_size", [(0, 1), (1, 2), (2, 3)])
def test_read_ahead_gives_the_sequential_order(dp_rank, dp_size):
    dataset = CountingDataset()
    sequential = MicroBatches(dataset, 5, 3, dp_rank, dp_size, prefetch=0)
    ahead = MicroBatches(dataset, 5, 3, dp_rank, dp_size, prefetch=2)
    assert_same_batches(read(ahead, 12), read(sequential, 12))
    assert ahead.next_sample == sequential.next_sample == 5 + 12 * 3 * dp_size
    ahead.close()


def test_moving_the_position_restarts_the_read_ahead():
    dataset = CountingDataset()
    ahead = MicroBatches(dataset, 0, 2, 0, 1, prefetch=3)
    read(ahead, 4)
    ahead.next_sample = 0  # e.g. the same global batch every step
    expected = [collate_micro_batch(dataset, start, 2) for start in (0, 2, 4)]
    assert_same_batches(read(ahead, 3), expected)
    ahead.close()


def test_read_ahead_thread_stops_on_close_and_when_dropped():
    def read_ahead_threads():
        return [t for t in threading.enumerate() if t.name == "micro-batch-read-ahead"]

    before = len(read_ahead_threads())
    batches = MicroBatches(CountingDataset(), 0, 2, 0, 1)
    next(batches)
    assert len(read_ahead_threads()) == before + 1
    batches.close()
    assert len(read_ahead_threads()) == before
    next(batches)
    del batches
    gc.collect()
    assert len(read_ahead_threads()) == before


def test_a_read_error_reaches_the_training_thread_in_order():
    batches = MicroBatches(CountingDataset(fail_at=6), 0, 2, 0, 1, prefetch=2)
    assert len(read(batches, 3)) == 3  # samples 0-5
    with pytest.raises(ValueError, match="sample 6 is damaged"):
        next(batches)


def test_chunk_iterators_replay_micro_batches_read_once():
    dataset = CountingDataset()
    batches = MicroBatches(dataset, 0, 2, 0, 1, prefetch=0)
    chunks = batches.chunk_iterators(3)
    # An interleaved schedule's order: chunks run ahead of each other by a few micro-batches.
    order = [0, 0, 1, 0, 1, 2, 1, 2, 2, 0, 1, 2]
    taken = {chunk: [] for chunk in range(3)}
    for chunk in order:
        taken[chunk].append(next(chunks[chunk]))
    assert dataset.reads == 4 * 2
    expected = [collate_micro_batch(dataset, 2 * i, 2) for i in range(4)]
    for chunk in range(3):
        assert_same_batches(taken[chunk], expected)
    assert batches.next_sample == 8


def test_one_chunk_reads_directly():
    batches = MicroBatches(CountingDataset(), 0, 2, 0, 1, prefetch=0)
    assert batches.chunk_iterators(1) == [batches]


def _broadcast_rank(rank: int, world: int, init_file: str, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    dataset = CountingDataset(fail_at=9)
    broadcast = TensorParallelBroadcast(torch.distributed.group.WORLD, source_rank=0, is_source=rank == 0)
    got = []
    for start in (0, 3, 6):
        local = collate_micro_batch(dataset, start, 3)
        got.append((broadcast(local if rank == 0 else None), local))
    error = None
    try:
        if rank == 0:
            try:
                collate_micro_batch(dataset, 9, 3)
            except ValueError as err:
                broadcast(None, err)
        else:
            broadcast(None)
    except ValueError as err:
        error = str(err)
    results[rank] = (got, error)
    torch.distributed.destroy_process_group()


def test_tensor_parallel_broadcast_equals_a_local_read(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_broadcast_rank, args=(2, str(tmp_path / "init"), results), nprocs=2)
        results = dict(results)
    for rank in (0, 1):
        got, error = results[rank]
        received, local = zip(*got)
        assert_same_batches(list(received), list(local))
        assert error == "sample 9 is damaged"
    assert len({batch["pixel_values"].shape for batch, _ in results[1][0]}) > 1  # shapes vary per batch
