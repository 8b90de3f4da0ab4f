"""Building a run's model: the checks before any process group, the model chunks for a config (model
transforms applied, DistributedDataParallel-wrapped), their optimizer and scheduler, and weights
from a checkpoint. Training set-up, the HF parity check and caption evaluation all get their model
from `build_from_checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_mm import megatron_settings
from megatron_mm.checkpoint.dist_ckpt import TrainState, load_checkpoint
from megatron_mm.config import Config, ConfigError
from megatron_mm.data.tokenizer import build_tokenizer
from megatron_mm.models.layers.backend import select_backend
from megatron_mm.runtime import backend_name, batch_p2p_comm_safe, init_distributed, set_seed, validate_layout
from megatron_mm.training.lr_schedule import build_scheduler
from megatron_mm.training.stages import stage_transforms
from megatron_mm.training.tasks import build_task
from megatron_mm.training.transforms import ModelTransform, apply_transforms, optimizer_overrides


def check_config(cfg: Config, world_size: int):
    """The checks that need no process group (layout, tokenizer, vocabulary, task): every rank finds
    the same problem. Returns (tokenizer or None for mock data, the layer backend)."""
    backend = select_backend(cfg.model.backend)
    validate_layout(cfg, world_size)
    build_task(cfg.train.task)
    tokenizer = None if cfg.data.mock else build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    _resolve_vocab_size(cfg, tokenizer)
    validate_layout(cfg, world_size)  # again, now that the vocabulary size is known
    megatron_settings.check_passthrough(cfg, backend)
    return tokenizer, backend


def _resolve_vocab_size(cfg: Config, tokenizer) -> None:
    if tokenizer is None:
        if cfg.model.vocab_size is None:
            raise ConfigError("model.vocab_size is required with data.mock=true")
        return
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}"
        )


def init_parallel(cfg: Config) -> None:
    """The process groups of cfg's layout, and the seeded generators."""
    p = cfg.parallel
    init_distributed(p.tp, p.pp, p.vpp, p.cp, p.ep)
    set_seed(cfg.train.seed)


def run_layout(cfg: Config, dp_size: int) -> dict:
    """The layout a checkpoint records (RNG states are restored only under the same one)."""
    p = cfg.parallel
    return {"tp": p.tp, "pp": p.pp, "vpp": p.vpp, "dp": dp_size, "ep": p.ep, "cp": p.cp}


def model_transforms(cfg: Config) -> list[ModelTransform]:
    """The ordered list of transforms applied to a built model."""
    return stage_transforms(cfg.train.freeze, cfg.train.lr_mult)


@dataclass
class BuiltModel:
    chunks: list  # DDP-wrapped model chunks (several with virtual pipeline stages)
    transformer_config: object
    transforms: list
    optimizer: object = None
    scheduler: object = None
    resumed: Optional[TrainState] = None  # the state of the checkpoint a run resumed


def build_from_checkpoint(cfg: Config, backend, checkpoint: str | Path | None = None, *, train: bool,
                          resume: bool = False) -> BuiltModel:
    """The model for `cfg` on this rank (process groups initialised), with an optimizer and scheduler
    when `train`, and weights from `checkpoint`: with `resume` also the optimizer, scheduler and RNG
    state of a training run (a run without an optimizer cannot resume)."""
    tconfig = cfg.model.transformer_config(
        cfg.parallel, cfg.train, backend, batch_p2p_comm=batch_p2p_comm_safe(backend_name(), cfg.parallel.pp))
    transforms = model_transforms(cfg)
    built = BuiltModel(build_model(cfg, tconfig, backend, transforms), tconfig, transforms)
    if train:
        built.optimizer, built.scheduler = build_optimizer(cfg, tconfig, built.chunks, transforms)
    if checkpoint is None:
        return built
    if resume:
        built.resumed = _resume(cfg, built, checkpoint)
    else:
        load_checkpoint(checkpoint, built.chunks, transforms=built.transforms)
        if built.optimizer is not None:
            # Mixed precision: the optimizer's fp32 main params were copied from the random init;
            # without this the first step would overwrite the loaded weights with them.
            built.optimizer.reload_model_params()
    return built


def _resume(cfg: Config, built: BuiltModel, checkpoint) -> TrainState:
    from megatron.core import parallel_state as ps

    # The optimizer's param groups carry their peak and minimum lr: a checkpoint's would win.
    configured = [(group["max_lr"], group["min_lr"]) for group in built.optimizer.param_groups]
    layout = run_layout(cfg, ps.get_data_parallel_world_size())
    state = load_checkpoint(checkpoint, built.chunks, built.optimizer, built.scheduler, layout, built.transforms)
    if cfg.train.resume_schedule == "config":  # (the load replaced the group dicts)
        for group, (max_lr, min_lr) in zip(built.optimizer.param_groups, configured):
            group["max_lr"], group["min_lr"] = max_lr, min_lr
        built.scheduler.step(increment=0)  # the rates of the resumed step, from those bounds
    return state


def build_model(cfg: Config, tconfig, backend, transforms: list[ModelTransform]) -> list:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    chunks = []
    for vp_stage in range(cfg.parallel.vpp or 1):
        stage = vp_stage if cfg.parallel.vpp else None
        chunk = cfg.model.build(
            tconfig,
            backend,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
        )
        for param in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    apply_transforms(chunks, transforms)  # names of the unwrapped model
    if tconfig.bf16 or tconfig.fp16:
        chunks = [Float16Module(tconfig, chunk) for chunk in chunks]

    ddp_config = megatron_settings.ddp_config(cfg)
    wrapped = [
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    for chunk in wrapped:
        chunk.broadcast_params()  # data-parallel replicas start identical
    return wrapped


def build_optimizer(cfg: Config, tconfig, model: list, transforms: list[ModelTransform]):
    from megatron.core.optimizer import get_megatron_optimizer

    t = cfg.train
    optimizer_config = megatron_settings.optimizer_config(cfg, tconfig)
    optimizer = get_megatron_optimizer(optimizer_config, model,
                                       config_overrides=optimizer_overrides(transforms, optimizer_config))
    return optimizer, build_scheduler(t, optimizer)
