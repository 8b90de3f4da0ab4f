"""Process-group setup: torchrun environment -> torch.distributed -> megatron-core parallel_state."""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from megatron_mm.runtime.cpu_compat import apply_cpu_compat


@dataclass(frozen=True)
class LaunchEnv:
    """What torchrun (or SLURM through torchrun) tells each process."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_environ(cls) -> "LaunchEnv":
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )


def backend_name() -> str:
    """NCCL when this process has a GPU, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def batch_p2p_comm_safe(backend: str, pipeline_size: int) -> bool:
    """Whether megatron-core may batch pipeline send/recv into one batch_isend_irecv.

    gloo pairs isend/irecv by (peer, tag) in posting order. With two pipeline stages the previous
    and next peer are the same rank, so in p2p_communication._batched_p2p_ops a gradient can land
    in an activation buffer: the loss is silently wrong. The non-batched path orders them safely.
    """
    return not (backend == "gloo" and pipeline_size == 2)


_model_parallel_sizes: dict = {}  # the sizes megatron-core's groups were last built with


def init_distributed(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline_parallel: int | None = None,
    context_parallel: int = 1,
    expert_parallel: int = 1,
    expert_tensor_parallel: int | None = None,
    timeout_minutes: int = 30,
) -> LaunchEnv:
    """Start torch.distributed from the torchrun environment and build megatron-core's groups.

    A plain `python` launch (no torchrun) runs as a world of one on a free local port.
    """
    from megatron.core import parallel_state

    env = LaunchEnv.from_environ()
    apply_cpu_compat()
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    if not torch.distributed.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(free_port())
        torch.distributed.init_process_group(
            backend=backend_name(),
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    sizes = dict(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
        context_parallel_size=context_parallel,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
    )
    if parallel_state.model_parallel_is_initialized() and sizes != _model_parallel_sizes:
        destroy_distributed(keep_process_group=True)  # another layout in the same process
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(**sizes, distributed_timeout_minutes=timeout_minutes)
        _model_parallel_sizes.clear()
        _model_parallel_sizes.update(sizes)
    return env


def set_seed(seed: int) -> None:
    """Seed every generator; megatron-core's tracker gives each TP rank its own model-parallel stream
    while data-parallel replicas share one."""
    from megatron.core import parallel_state, tensor_parallel

    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    stage_seed = seed + 100 * pp_rank  # different dropout masks per stage, as Megatron-LM does
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def destroy_distributed(keep_process_group: bool = False) -> None:
    """Drop megatron-core's groups and the per-layer loss trackers it keeps across models; with
    `keep_process_group` the torch.distributed world stays up, so that the same processes can
    initialise another layout next."""
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    # Sized by the first model's layer count and added to on every step: a later model with more
    # layers would index past them.
    get_moe_layer_wise_logging_tracker().clear()
    MTPLossLoggingHelper.tracker.clear()
    if torch.distributed.is_initialized() and not keep_process_group:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a local rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
