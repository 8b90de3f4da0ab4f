"""Training-sample order that depends only on the sample index, never on the run's length.

megatron-core's GPTDataset shuffles all the epochs a run asks for at once, so asking for more
samples (a longer train_iters) reorders even the first ones. Instead the text datasets are built for
a fixed number of samples derived from the data alone (one epoch, or for weighted blends the blend
of about one epoch of every source), and `ReshuffledEpochs` repeats that with a fresh seeded
permutation per further epoch: a longer run sees the same samples up to the old end.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy
from torch.utils.data import Dataset

from megatron_mm.data.indexed_format import check_indexed_dataset


class ReshuffledEpochs(Dataset):
    """Sample i of `num_samples`: epoch i // len(base), permuted by (seed, epoch) after the first."""

    def __init__(self, base: Dataset, seed: int, num_samples: int):
        if len(base) == 0:
            raise ValueError("the training split holds no sample")
        self.base, self.seed, self.num_samples = base, seed, num_samples
        self._permutations: dict[int, numpy.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        epoch, offset = divmod(int(index), len(self.base))
        if epoch == 0:  # the base dataset is shuffled already
            return self.base[offset]
        if epoch not in self._permutations:
            self._permutations[epoch] = numpy.random.default_rng([self.seed, epoch]).permutation(len(self.base))
        return self.base[int(self._permutations[epoch][offset])]


def epoch_request(prefixes: Sequence[str], weights: Optional[Sequence[float]], split: str,
                  seq_length: int) -> Optional[int]:
    """The train-split size to build, independent of the run's length: None (one epoch of every
    source) for unweighted data; for weighted blends, which megatron-core builds only for a given
    size, the number of sequences one epoch of all sources' train documents would give."""
    if weights is None:
        return None
    fractions = [float(part) for part in split.replace("/", ",").split(",")]
    train_fraction = fractions[0] / sum(fractions)
    # The index check names a truncated or empty dataset, and its summary holds the token count.
    summaries = [check_indexed_dataset(prefix) for prefix in prefixes]
    tokens = sum(summary.bin_bytes // summary.dtype.itemsize for summary in summaries)
    return max(1, int(tokens * train_fraction) // seq_length)
