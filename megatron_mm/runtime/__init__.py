from megatron_mm.runtime.cpu_compat import apply_cpu_compat
from megatron_mm.runtime.distributed import (
    LaunchEnv,
    backend_name,
    batch_p2p_comm_safe,
    destroy_distributed,
    init_distributed,
    set_seed,
)
from megatron_mm.runtime.layout import validate_layout

__all__ = [
    "LaunchEnv",
    "apply_cpu_compat",
    "backend_name",
    "batch_p2p_comm_safe",
    "destroy_distributed",
    "init_distributed",
    "set_seed",
    "validate_layout",
]
