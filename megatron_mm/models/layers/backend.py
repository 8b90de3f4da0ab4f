"""Backend choice: Transformer Engine layer specs when TE imports on a GPU, megatron-core's local
(pure torch) specs otherwise."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # TE import failures are many-shaped (ImportError, OSError on missing libs)
        return False
    return True
