"""Token ids beyond the model's vocabulary, refused when datasets are built.

An id >= vocab_size crashes the embedding lookup on one rank but is silently masked to a zero
embedding by the vocabulary-parallel embedding at TP>1, so it is checked up front, for every dataset
of a blend. Finding the largest id reads the whole .bin once; the answer is kept in a small sidecar
file, PREFIX.max_token_id.json, valid while the .idx and .bin keep their size and modification time
(a read-only directory only costs the re-read).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch

from megatron_mm.errors import UserError

SIDECAR_SUFFIX = ".max_token_id.json"


def _file_stamps(prefix: str) -> dict[str, list[int]]:
    stamps = {}
    for suffix in ("idx", "bin"):
        stat = os.stat(f"{prefix}.{suffix}")
        stamps[suffix] = [stat.st_size, stat.st_mtime_ns]
    return stamps


def cached_max_token_id(prefix: str, compute: Callable[[], int]) -> int:
    """compute() once per content of PREFIX.{idx,bin}, remembered in the sidecar file."""
    sidecar = prefix + SIDECAR_SUFFIX
    stamps = _file_stamps(prefix)
    try:
        with open(sidecar, encoding="utf-8") as cached:
            record = json.load(cached)
        if record.get("files") == stamps and isinstance(record.get("max_token_id"), int):
            return record["max_token_id"]
    except (OSError, ValueError):
        pass  # absent, unreadable or stale: computed again
    largest = int(compute())
    partial = f"{sidecar}.{os.getpid()}.partial"
    try:
        with open(partial, "w", encoding="utf-8") as out:
            json.dump({"files": stamps, "max_token_id": largest}, out)
        os.replace(partial, sidecar)  # ranks writing at once each publish a complete file
    except OSError:
        try:
            os.remove(partial)
        except OSError:
            pass
    return largest


def check_vocabulary(prefix: str, largest: int, vocab_size: Optional[int]) -> None:
    if vocab_size is not None and largest >= vocab_size:
        raise UserError(f"{prefix}: largest token id {largest} is outside the model's vocabulary "
                        f"(model.vocab_size={vocab_size}): preprocess it with the model's tokenizer, or set "
                        f"model.vocab_size to at least {largest + 1}")


def rank_zero_first(check: Callable[[], None]) -> None:
    """check() on global rank 0, then on the other ranks (which find rank 0's cached results).

    Every rank must call this when torch.distributed is initialized (it holds a barrier); a failure
    on rank 0 still reaches the barrier, so the other ranks are not left waiting on it.
    """
    if not torch.distributed.is_initialized():
        check()
        return
    failure = None
    if torch.distributed.get_rank() == 0:
        try:
            check()
        except Exception as err:  # raised after the barrier
            failure = err
    torch.distributed.barrier()
    if failure is not None:
        raise failure
    if torch.distributed.get_rank() != 0:
        check()
