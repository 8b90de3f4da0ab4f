"""What every part that walks a built model needs from megatron-core's wrappers."""

from __future__ import annotations


def unwrap(chunk):
    """The bare model under DDP / Float16Module wrappers, so checkpoint keys and module names are
    layout- and precision-independent."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
