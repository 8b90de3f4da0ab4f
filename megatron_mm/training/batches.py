"""Datasets and per-rank micro-batch iterators for the pretraining loop.

Global batch i holds samples [i*gbs, (i+1)*gbs) of the training set, whatever the layout: each
data-parallel rank takes its slice of each run of micro_batch_size*dp samples (Megatron-LM's
pretraining sampler), and tensor/pipeline ranks of one replica read the same samples. So the loss of
a global batch, and the data position after a resume, depend only on the number of consumed samples.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import weakref

import torch

from megatron_mm.config import Config
from megatron_mm.data.epochs import ReshuffledEpochs, epoch_request
from megatron_mm.data.mm_training import TEXT_KEYS

# Stacked per sample: a training sequence's text keys; every other key of a sample is media (images,
# patches, audio features) with a leading item dimension, concatenated over the micro-batch
# (models/multimodal.py reads them).
BATCH_KEYS = TEXT_KEYS


def build_datasets(cfg: Config, tokenizer, num_samples: tuple[int, int, int]):
    """(train, valid, test) datasets; valid/test may be None."""
    from megatron_mm.data.gpt_data import build_gpt_datasets, parse_blend
    from megatron_mm.models.multimodal import MultimodalFamily

    if isinstance(cfg.model, MultimodalFamily):
        return _multimodal_datasets(cfg, tokenizer, num_samples)  # their order is prefix-stable already
    train_request = None
    if not cfg.data.mock:
        train_request = epoch_request(*parse_blend(cfg.data.blend), cfg.data.split, cfg.data.seq_length)
    train, valid, test = build_gpt_datasets(
        blend=cfg.data.blend,
        split=cfg.data.split,
        seq_length=cfg.data.seq_length,
        seed=cfg.train.seed,
        num_samples=(train_request, *num_samples[1:]),
        tokenizer=tokenizer,
        cache_dir=cfg.data.cache_dir,
        mock=cfg.data.mock,
        vocab_size=cfg.model.vocab_size,
    )
    if train is not None:  # a longer run sees the same samples up to the shorter one's end
        train = ReshuffledEpochs(train, cfg.train.seed, num_samples[0])
    return train, valid, test


def _multimodal_datasets(cfg: Config, tokenizer, num_samples: tuple[int, int, int]):
    """Generated captions (data.mock: tones for audio families, shapes otherwise), or packed
    samples of mm_indexed prefixes (data.blend)."""
    if cfg.data.mock:
        if "audio" in cfg.model.placeholder_ids():
            from megatron_mm.data.mock_audio_caption import build_mock_audio_caption_datasets

            return build_mock_audio_caption_datasets(cfg, num_samples)
        from megatron_mm.data.mock_image_caption import build_mock_image_caption_datasets

        return build_mock_image_caption_datasets(cfg, num_samples)
    from megatron_mm.data.mm_training import build_mm_datasets, format_packing_stats

    datasets = build_mm_datasets(cfg, cfg.model.media_processors(), num_samples, cfg.model.position_ids,
                                 pad_token_id=tokenizer.pad, families_taking=_families_taking)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        for name, dataset in zip(("train", "valid", "test"), datasets):
            if dataset is not None:
                print(format_packing_stats(name, dataset.stats), flush=True)
    return datasets


def _families_taking(modality: str) -> list[str]:
    """The registered multimodal families with an encoder for `modality`."""
    from megatron_mm.models.multimodal import MultimodalFamily
    from megatron_mm.models.registry import FAMILIES, family_config_class

    return [name for name in FAMILIES if issubclass(config_class := family_config_class(name), MultimodalFamily)
            and modality in config_class().placeholder_ids()]


class MicroBatches:
    """Endless iterator over this data-parallel rank's micro-batches, from a sample offset on.

    Read ahead on a background thread (`prefetch` micro-batches queued, in order), and with
    tensor parallelism only on the group's first rank, which broadcasts each micro-batch to the
    others as Megatron-LM's get_batch does. `next_sample` is the position of the next micro-batch
    handed out (not of the read-ahead); setting it restarts reading there. The thread stops with
    close(), or when the iterator is no longer referenced (end of training, an error).
    """

    def __init__(self, dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 prefetch: int = 2):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.prefetch = prefetch
        self._broadcast = TensorParallelBroadcast.of_megatron_groups()
        self._next_sample = consumed_samples
        self._reader: _ReadAhead | None = None  # started by the first next()

    @property
    def next_sample(self) -> int:
        return self._next_sample

    @next_sample.setter
    def next_sample(self, position: int) -> None:
        if position != self._next_sample:
            self.close()  # what was read ahead belongs to the old position
        self._next_sample = position

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._broadcast is None:
            batch = self._read_next()
        else:
            batch = error = None
            if self._broadcast.is_source:
                try:
                    batch = self._read_next()
                except Exception as err:  # bad data: every rank of the group raises it, none waits
                    error = err
            batch = self._broadcast(batch, error)
        self._next_sample += self.micro_batch_size * self.dp_size
        return batch

    def _read_next(self) -> dict:
        if self.prefetch <= 0:
            return collate_micro_batch(self.dataset, self._next_sample + self.dp_rank * self.micro_batch_size,
                                       self.micro_batch_size)
        if self._reader is None:
            self._reader = _ReadAhead(self.dataset, self._next_sample + self.dp_rank * self.micro_batch_size,
                                      self.micro_batch_size, self.micro_batch_size * self.dp_size, self.prefetch)
        return self._reader.next()

    def close(self) -> None:
        """Stops the read-ahead thread; a later next() starts a new one at next_sample."""
        if self._reader is not None:
            self._reader.stop()
            self._reader = None

    def chunk_iterators(self, num_chunks: int) -> list:
        """One iterator per virtual-pipeline model chunk over the same micro-batches: each is read
        once and replayed to every chunk, in whatever order the schedule asks for them."""
        if num_chunks == 1:
            return [self]
        replay = _Replay(self, num_chunks)
        return [replay.iterator(chunk) for chunk in range(num_chunks)]


def collate_micro_batch(dataset, start: int, micro_batch_size: int) -> dict:
    """Samples [start, start + micro_batch_size) (wrapping around the dataset): BATCH_KEYS stacked,
    media concatenated over their leading item dimension."""
    samples = [dataset[(start + i) % len(dataset)] for i in range(micro_batch_size)]
    batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in BATCH_KEYS}
    for key in samples[0].keys() - batch.keys():
        batch[key] = torch.cat([torch.as_tensor(s[key]) for s in samples])
    return batch


class _ReadAhead:
    """A thread collating micro-batches at start, start + stride, ... into a bounded queue. It
    holds no reference to its MicroBatches, so dropping that stops it (weakref finalizer)."""

    def __init__(self, dataset, start: int, micro_batch_size: int, stride: int, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        stop = threading.Event()
        thread = threading.Thread(target=_read_ahead, args=(stop, self._queue, dataset, start, micro_batch_size, stride),
                                  name="micro-batch-read-ahead", daemon=True)
        thread.start()
        self._finalizer = weakref.finalize(self, _stop_thread, stop, self._queue, thread)

    def next(self) -> dict:
        batch, error = self._queue.get()
        if error is not None:
            self.stop()
            raise error
        return batch

    def stop(self) -> None:
        self._finalizer()


def _read_ahead(stop: threading.Event, ready: queue.Queue, dataset, start: int, micro_batch_size: int,
                stride: int) -> None:
    position = start
    while not stop.is_set():
        try:
            item = (collate_micro_batch(dataset, position, micro_batch_size), None)
        except Exception as err:  # handed to the training thread, which raises it
            item = (None, err)
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                break
            except queue.Full:
                continue
        if item[1] is not None:
            return
        position += stride


def _stop_thread(stop: threading.Event, pending: queue.Queue, thread: threading.Thread) -> None:
    stop.set()
    with contextlib.suppress(queue.Empty):
        while True:  # unblocks a put waiting for room
            pending.get_nowait()
    if thread is not threading.current_thread():
        thread.join()


class _Replay:
    """Micro-batches read once from `source` and handed to each of `num_chunks` iterators in
    order; one is dropped when every chunk has taken it."""

    def __init__(self, source, num_chunks: int):
        self.source = source
        self.num_chunks = num_chunks
        self.read = 0  # micro-batches taken from source
        self.held: dict[int, list] = {}  # index -> [batch, chunks still to take it]

    def iterator(self, chunk: int):
        index = 0
        while True:
            if index == self.read:
                self.held[index] = [next(self.source), self.num_chunks]
                self.read += 1
            entry = self.held[index]
            entry[1] -= 1
            if entry[1] == 0:
                del self.held[index]
            yield entry[0]
            index += 1


class TensorParallelBroadcast:
    """Hands the micro-batch read on the tensor-parallel group's source rank to the other ranks of
    the group: the keys, shapes and dtypes first (media shapes vary per batch), then one flat
    buffer per dtype. The result is on the device the group's collectives use."""

    def __init__(self, group, source_rank: int, is_source: bool):
        self.group, self.source_rank, self.is_source = group, source_rank, is_source
        self.device = torch.device(torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    @classmethod
    def of_megatron_groups(cls) -> "TensorParallelBroadcast | None":
        """Over megatron-core's tensor-parallel group; None without one of two or more ranks."""
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized() or ps.get_tensor_model_parallel_world_size() == 1:
            return None
        return cls(ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_src_rank(),
                   ps.get_tensor_model_parallel_rank() == 0)

    def __call__(self, batch: dict | None, error: Exception | None = None) -> dict:
        """The source's batch (or the error its read raised, raised on every rank)."""
        layout = [None]
        if self.is_source:
            layout = [error or [(key, tuple(value.shape), value.dtype) for key, value in batch.items()]]
        torch.distributed.broadcast_object_list(layout, src=self.source_rank, group=self.group,
                                                device=self.device)
        layout = layout[0]
        if isinstance(layout, Exception):
            raise layout
        received = {}
        for dtype in dict.fromkeys(dtype for _, _, dtype in layout):
            entries = [(key, shape) for key, shape, entry_dtype in layout if entry_dtype == dtype]
            wire_dtype = torch.uint8 if dtype == torch.bool else dtype  # gloo has no bool
            if self.is_source:
                flat = torch.cat([batch[key].reshape(-1) for key, _ in entries]).to(self.device, wire_dtype)
            else:
                flat = torch.empty(sum(math.prod(shape) for _, shape in entries), dtype=wire_dtype,
                                   device=self.device)
            torch.distributed.broadcast(flat, src=self.source_rank, group=self.group)
            pieces = flat.to(dtype).split([math.prod(shape) for _, shape in entries])
            received.update({key: piece.view(shape) for (key, shape), piece in zip(entries, pieces)})
        return {key: received[key] for key, _, _ in layout}
