"""Training-sample order is a function of the sample index only: a longer run (more train_iters, so
more epochs of a small dataset) sees the same samples as a shorter one up to the shorter one's end."""

import numpy
import pytest
import torch

from megatron_mm.config import load_config
from megatron_mm.training.batches import build_datasets

SEQ_LENGTH = 16


class Tokenizer:  # what the dataset builder reads of a tokenizer
    vocab_size, eod, pad = 256, 0, None


def write_prefix(path, seed: int, num_docs: int = 20) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = numpy.random.default_rng(seed)
    builder = IndexedDatasetBuilder(str(path) + ".bin", dtype=numpy.int32)
    for _ in range(num_docs):
        tokens = rng.integers(1, 250, size=int(rng.integers(20, 80)), dtype=numpy.int32)
        builder.add_document(torch.from_numpy(tokens), [len(tokens)])
    builder.finalize(str(path) + ".idx")
    return str(path)


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("order")
    return write_prefix(root / "a", 0), write_prefix(root / "b", 1, num_docs=8)


def train_tokens(blend, num_samples: int, tmp_path) -> numpy.ndarray:
    cfg = load_config(None, ["model.family=llama3", "model.vocab_size=256", f"data.seq_length={SEQ_LENGTH}",
                             f"data.blend={blend}", "data.split=100,0,0", f"data.cache_dir={tmp_path}"])
    train, _, _ = build_datasets(cfg, Tokenizer(), (num_samples, 0, 0))
    assert len(train) == num_samples
    return numpy.stack([numpy.asarray(train[i]["tokens"]) for i in range(num_samples)])


@pytest.mark.parametrize("weighted", [False, True], ids=["one_prefix", "weighted_blend"])
def test_longer_run_sees_the_same_samples_first(prefixes, tmp_path, weighted):
    blend = f"[0.7,{prefixes[0]},0.3,{prefixes[1]}]" if weighted else f"[{prefixes[0]}]"
    short = train_tokens(blend, 40, tmp_path / "short")
    long = train_tokens(blend, 600, tmp_path / "long")  # many epochs of this small data
    numpy.testing.assert_array_equal(long[:40], short)


def test_later_epochs_reshuffle_the_first(prefixes, tmp_path):
    cfg = load_config(None, ["model.family=llama3", "model.vocab_size=256", f"data.seq_length={SEQ_LENGTH}",
                             f"data.blend=[{prefixes[0]}]", "data.split=100,0,0", f"data.cache_dir={tmp_path}"])
    train, _, _ = build_datasets(cfg, Tokenizer(), (10_000, 0, 0))
    epoch = len(train.base)
    first = [tuple(numpy.asarray(train[i]["tokens"])) for i in range(epoch)]
    second = [tuple(numpy.asarray(train[i]["tokens"])) for i in range(epoch, 2 * epoch)]
    assert sorted(first) == sorted(second) and first != second
