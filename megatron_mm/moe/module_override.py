"""Call-scoped override of a module-level function in megatron-core.

megatron-core's MoE router and dispatcher call module-level helpers (topk_routing_with_score_function,
permute, unpermute). Our subclasses point those names at our kernels for the duration of one call of
the parent method, so megatron-core's surrounding logic runs unchanged and is not copied here.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def module_function(module, name: str, replacement):
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)
