"""Lets megatron-core 0.16.1 run on CPU with gloo.

megatron-core hard-codes CUDA in a few hundred places. Rather than fork it, this module patches
exactly the points that break, once, before any model is built, and only when CUDA is absent.
Each patch names the megatron-core call site it serves. On a GPU none of this is applied.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_CPU = torch.device("cpu")


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites `device="cuda"` / `.to("cuda")` to CPU and drops `pin_memory`.

    Serves the ~60 hard-coded sites in pipeline_parallel/schedules.py (torch.zeros(..., device="cuda")),
    optimizer/optimizer.py and clip_grads.py, grad_scaler.py, transformer/moe/moe_utils.py,
    tensor_parallel/data.py, distributed/param_and_grad_buffer.py and utils.py (pin_memory).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        if func in (torch.Tensor.to, torch.Tensor.pin_memory):
            if func is torch.Tensor.pin_memory:
                return args[0]
            args = tuple(_CPU if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


class _DummyStream:
    """Stands in for torch.cuda.Stream: transformer/moe/token_dispatcher.py, DDP overlap, timers."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _DummyEvent()

    def synchronize(self):
        pass


class _DummyEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_original_tensor_type = torch.Tensor.type


def _tensor_type_as_cuda(self, *args, **kwargs):
    """optimizer/clip_grads.py, optimizer.py and distrib_optimizer.py compare `param.type()` with
    'torch.cuda.FloatTensor'; report CPU tensors under the CUDA name (no-argument form only)."""
    name = _original_tensor_type(self, *args, **kwargs)
    if args or kwargs or not isinstance(name, str):
        return name
    if name.startswith("torch.") and not name.startswith("torch.cuda.") and self.device.type == "cpu":
        return "torch.cuda." + name[len("torch."):]
    return name


def _patch_torch_cuda() -> None:
    # utils.py GlobalMemoryBuffer.get_tensor, tensor_parallel/layers.py and mappings.py:
    # `device=torch.cuda.current_device()` at ~175 sites.
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Stream = _DummyStream
    torch.cuda.Event = _DummyEvent
    torch.cuda.current_stream = lambda *a, **k: _DummyStream()
    torch.cuda.default_stream = lambda *a, **k: _DummyStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.nvtx.range_push = lambda *a, **k: None
    torch.cuda.nvtx.range_pop = lambda *a, **k: None
    # tensor_parallel/random.py (_get_cuda_rng_state, _set_cuda_rng_state, CudaRNGStatesTracker,
    # model_parallel_cuda_manual_seed) and rerun_state_machine.py: the CUDA generator becomes the
    # CPU one, so the tracker's fork() swaps CPU generator states.
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # (torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the generator directly.)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: torch.default_generator.manual_seed(int(seed))
    # Tensor.cuda() in schedules.py, tensor_parallel/data.py and the vision models.
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.type = _tensor_type_as_cuda


def _patch_megatron() -> None:
    import megatron.core.tensor_parallel.random as tp_random
    import megatron.core.transformer.moe.moe_utils as moe_utils
    import megatron.core.tensor_parallel.mappings as mappings
    from megatron.core.transformer import torch_norm

    # tensor_parallel/random.py keeps private helpers that call torch.cuda's default generator directly.
    tp_random._set_cuda_rng_state = lambda new_state, *a, **k: torch.set_rng_state(new_state)
    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    # With one generator, the tracker's fork() sees the "CPU" state move inside the "GPU" context
    # and logs a warning on every forward: expected here, so silenced.
    logging.getLogger(tp_random.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage()
    )

    # moe/moe_utils.py maybe_move_tensor_to_cpu only converts CUDA tensors; all_to_all_single on
    # gloo needs the alltoall split sizes as Python lists / numpy.
    original_move = moe_utils.maybe_move_tensor_to_cpu

    def move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy() if as_numpy else tensor
        return original_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = move_tensor_to_cpu
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    token_dispatcher.maybe_move_tensor_to_cpu = move_tensor_to_cpu

    # tensor_parallel/mappings.py gather_from_sequence_parallel_region(output_split_sizes=...):
    # gloo's all_gather rejects uneven shapes, so pad to the largest chunk, gather, slice back.
    def gather_uneven_along_first_dim(input_, group, output_split_sizes=None, *args, **kwargs):
        if output_split_sizes is None:
            return original_gather(input_, group, output_split_sizes, *args, **kwargs)
        world_size = torch.distributed.get_world_size(group)
        if world_size == 1:
            return input_
        longest = max(output_split_sizes)
        padded = torch.zeros((longest,) + tuple(input_.shape[1:]), dtype=input_.dtype)
        padded[: input_.shape[0]] = input_
        gathered = torch.empty((longest * world_size,) + tuple(input_.shape[1:]), dtype=input_.dtype)
        torch.distributed.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
        chunks = [gathered[r * longest : r * longest + n] for r, n in enumerate(output_split_sizes)]
        return torch.cat(chunks, dim=0)

    original_gather = mappings._gather_along_first_dim
    mappings._gather_along_first_dim = gather_uneven_along_first_dim

    # transformer/torch_norm.py WrappedTorchNorm asserts when sequence_parallel is on. Build the
    # norm without SP and tag its params `.sequence_parallel`, as Apex's FusedLayerNorm does, so
    # finalize_model_grads all-reduces their grads over the TP group.
    original_new = torch_norm.WrappedTorchNorm.__new__

    def wrapped_norm_new(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, eps, *args, **kwargs)
        import dataclasses

        norm = original_new(
            cls, dataclasses.replace(config, sequence_parallel=False), hidden_size, eps, *args, **kwargs
        )
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = wrapped_norm_new

    # transformer/multi_latent_attention.py checks isinstance(x, TELinear) where TELinear is a
    # MagicMock placeholder when TE is absent.
    import megatron.core.transformer.multi_latent_attention as mla

    mla.HAVE_TE = False


def _enter_mode_in_custom_backward(mode: TorchFunctionMode) -> None:
    """autograd runs custom Functions' backward with an empty torch-function mode stack. Activation
    recompute (tensor_parallel/random.py CheckpointFunction.backward re-runs the layers' forward,
    e.g. transformer/utils.py get_default_causal_mask(device="cuda")) needs the mode there too."""
    from torch.autograd.function import BackwardCFunction

    original_apply = BackwardCFunction.apply

    def apply_with_mode(self, *args):
        with mode:
            return original_apply(self, *args)

    BackwardCFunction.apply = apply_with_mode


def _patch_megatron_without_te() -> None:
    """megatron-core 0.16.1 bugs that show without Transformer Engine on any device."""
    import megatron.core.transformer.moe.moe_utils as moe_utils

    # The router gating path refers to te_general_gemm, undefined without TE.
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def apply_cpu_compat() -> None:
    """Apply every CPU patch once (only the TE-absence fixes when CUDA is available)."""
    global _APPLIED
    if _APPLIED:
        return
    _patch_megatron_without_te()
    if torch.cuda.is_available():
        return
    _patch_torch_cuda()
    _patch_megatron()
    mode = _CudaToCpuMode()
    mode.__enter__()
    _enter_mode_in_custom_backward(mode)
    _APPLIED = True
