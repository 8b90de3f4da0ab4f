"""The pretraining loop: one file, readable top to bottom.

    torchrun --nproc_per_node N -m megatron_mm.pretrain --config FILE.yaml [section.key=value ...]

megatron-core does the parallel work (TP/SP/PP/VPP/CP/EP, DDP, distributed optimizer, schedules,
dist_checkpointing); this file wires it together with our config, data and model zoo.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_mm.checkpoint.dist_ckpt import (
    TrainState,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from megatron_mm.config import Config, ConfigError, load_config
from megatron_mm.data.tokenizer import build_tokenizer
from megatron_mm.errors import UserError
from megatron_mm.moe.balancing import ExpertBalancing
from megatron_mm.runtime import LaunchEnv, transformer_engine_available, validate_layout
from megatron_mm.runtime.layout import data_parallel_size
from megatron_mm.training.batches import BATCH_KEYS, MicroBatches, build_datasets
from megatron_mm.training.lr_schedule import build_scheduler, schedule_in_force
from megatron_mm.training.resume import describe_resume
from megatron_mm.training.metrics import TrainingLogger, cuda_peak_tflops
from megatron_mm.training.stages import apply_stage, lr_overrides
from megatron_mm.training.stop_signals import StopSignals


@dataclass
class Trainer:
    """Everything one rank holds for a run."""

    cfg: Config
    model: list  # DDP-wrapped model chunks (several with virtual pipeline stages)
    optimizer: object
    scheduler: object
    transformer_config: object
    train_data: object
    valid_data: object
    dp_rank: int
    dp_size: int
    expert_balancing: ExpertBalancing
    stop_signals: StopSignals = field(default_factory=StopSignals)  # installed while train() runs
    iteration: int = 0
    saved_iteration: Optional[int] = None  # the iteration of the checkpoint this run last wrote or resumed

    @property
    def num_microbatches(self) -> int:
        t = self.cfg.train
        return t.global_batch_size // (t.micro_batch_size * self.dp_size)

    @property
    def layout(self) -> dict:
        p = self.cfg.parallel
        return {"tp": p.tp, "pp": p.pp, "vpp": p.vpp, "dp": self.dp_size, "ep": p.ep, "cp": p.cp}


# ---------------------------------------------------------------------------------------------
# set-up
# ---------------------------------------------------------------------------------------------
def check_config(cfg: Config, world_size: int):
    """The checks that need no process group (layout, tokenizer, vocabulary): every rank finds the
    same problem. Returns (tokenizer or None for mock data, whether Transformer Engine is used)."""
    use_te = transformer_engine_available()
    validate_layout(cfg, world_size, use_te)
    tokenizer = None if cfg.data.mock else build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
    _resolve_vocab_size(cfg, tokenizer)
    validate_layout(cfg, world_size, use_te)  # again, now that the vocabulary size is known
    return tokenizer, use_te


def setup(cfg: Config) -> Trainer:
    from megatron.core import parallel_state as ps
    from megatron_mm.runtime import backend_name, batch_p2p_comm_safe, init_distributed, set_seed

    tokenizer, use_te = check_config(cfg, LaunchEnv.from_environ().world_size)
    p = cfg.parallel
    init_distributed(p.tp, p.pp, p.vpp, p.cp, p.ep)
    set_seed(cfg.train.seed)
    tconfig = cfg.model.transformer_config(
        p, cfg.train, use_te=use_te, batch_p2p_comm=batch_p2p_comm_safe(backend_name(), p.pp)
    )
    model = build_model(cfg, tconfig, use_te)
    optimizer, scheduler = build_optimizer(cfg, tconfig, model)

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    t = cfg.train
    valid_samples = t.eval_iters * t.global_batch_size if t.eval_interval else 0
    train_ds, valid_ds, _ = build_datasets(cfg, tokenizer, (t.train_iters * t.global_batch_size, valid_samples, 0))
    fused_bias_update = getattr(cfg.model, "expert_bias_update", None) == "fused_kernel"  # MoE families only
    balancing = ExpertBalancing(model, tconfig, fused_update=fused_bias_update)
    trainer = Trainer(cfg, model, optimizer, scheduler, tconfig, train_ds, valid_ds, dp_rank, dp_size, balancing)
    _load_initial_state(trainer)
    _wire_schedule_hooks(trainer)
    return trainer


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


def build_model(cfg: Config, tconfig, use_te: bool) -> list:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    chunks = []
    for vp_stage in range(cfg.parallel.vpp or 1):
        stage = vp_stage if cfg.parallel.vpp else None
        chunk = cfg.model.build(
            tconfig,
            use_te,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage,
        )
        for param in chunk.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    apply_stage(chunks, cfg.train.freeze, cfg.train.lr_mult)  # names of the unwrapped model
    if tconfig.bf16:
        chunks = [Float16Module(tconfig, chunk) for chunk in chunks]

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    for chunk in wrapped:
        chunk.broadcast_params()  # data-parallel replicas start identical
    return wrapped


def build_optimizer(cfg: Config, tconfig, model):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    t = cfg.train
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=tconfig.bf16,
        params_dtype=tconfig.params_dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(optimizer_config, model,
                                       config_overrides=lr_overrides(t.lr_mult, optimizer_config))
    return optimizer, build_scheduler(t, optimizer)


def _load_initial_state(trainer: Trainer) -> None:
    """Resume (model + optimizer + scheduler + data position), or start from weights only."""
    t = trainer.cfg.train
    resume_from = None
    if t.resume == "auto":
        resume_from = find_latest_checkpoint(t.output_dir, warn=_print_rank0)
    elif t.resume != "none":
        resume_from = t.resume
    if resume_from is not None:
        # The optimizer's param groups carry their peak and minimum lr: a checkpoint's would win.
        configured = [(group["max_lr"], group["min_lr"]) for group in trainer.optimizer.param_groups]
        state = load_checkpoint(resume_from, trainer.model, trainer.optimizer, trainer.scheduler, trainer.layout)
        if t.resume_schedule == "config":  # (the load replaced the group dicts)
            for group, (max_lr, min_lr) in zip(trainer.optimizer.param_groups, configured):
                group["max_lr"], group["min_lr"] = max_lr, min_lr
            trainer.scheduler.step(increment=0)  # the rates of the resumed step, from those bounds
        trainer.iteration = trainer.saved_iteration = state.iteration
        schedule = schedule_in_force(trainer.scheduler)
        for line in describe_resume(resume_from, state.iteration, trainer.cfg, schedule):
            _print_rank0(line)
        if t.resume_schedule == "checkpoint":  # so that the configs this run saves tell the truth
            for key, value in schedule.items():
                setattr(t, key, value)
    elif t.init_from:
        load_checkpoint(t.init_from, trainer.model)
        # Mixed precision: the optimizer's fp32 main params were copied from the random init; without
        # this the first step would overwrite the loaded weights with them.
        trainer.optimizer.reload_model_params()
        _print_rank0(f"initialised weights from {t.init_from}")


def _wire_schedule_hooks(trainer: Trainer) -> None:
    """The callbacks megatron-core's schedules take from the TransformerConfig."""
    config, model = trainer.transformer_config, trainer.model
    config.finalize_model_grads_func = trainer.expert_balancing.finalize_model_grads
    config.grad_scale_func = trainer.optimizer.scale_loss
    config.no_sync_func = [chunk.no_sync for chunk in model]
    if len(model) == 1:
        config.no_sync_func = config.no_sync_func[0]
    if trainer.cfg.parallel.overlap_grad_reduce:
        config.grad_sync_func = [chunk.start_grad_sync for chunk in model]
        if len(model) == 1:
            config.grad_sync_func = config.grad_sync_func[0]
    if trainer.cfg.parallel.overlap_param_gather:
        config.param_sync_func = [chunk.start_param_sync for chunk in model]
        if len(model) == 1:
            config.param_sync_func = config.param_sync_func[0]


# ---------------------------------------------------------------------------------------------
# one step
# ---------------------------------------------------------------------------------------------
def forward_step(data_iterator, model):
    batch = next(data_iterator)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    return model_forward(model, batch, with_labels=True), functools.partial(loss_func, batch["loss_mask"])


def model_forward(model, batch: dict, with_labels: bool):
    """Per-token losses [B, S] (with labels) or logits [B, S, V], aligned with batch["tokens"].
    Keys beyond BATCH_KEYS are media for a multimodal model."""
    position_ids = batch["position_ids"]
    if position_ids.dim() == 3:  # M-RoPE: [B, 3, S] -> [3, B, S]
        position_ids = position_ids.transpose(0, 1).contiguous()
    media = {key: value for key, value in batch.items() if key not in BATCH_KEYS}
    labels = batch["labels"] if with_labels else None
    return model(batch["tokens"], position_ids, None, labels=labels, **media)


def loss_func(loss_mask, per_token_loss):
    """Sum of token losses and the token count: megatron-core divides by the global count."""
    from megatron.core import parallel_state as ps

    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(per_token_loss.float().reshape(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), mask.sum()])
    torch.distributed.all_reduce(report, group=ps.get_data_parallel_group(with_context_parallel=True))
    return loss_sum, num_tokens, {"lm loss": report}


def _mean_loss(reports: list) -> float | None:
    """Token-weighted mean over micro-batches; None on ranks that hold no loss (not last stage)."""
    if not reports:
        return None
    total = torch.stack([r["lm loss"] for r in reports]).sum(dim=0)
    return (total[0] / total[1].clamp(min=1)).item()


def run_schedule(trainer: Trainer, batches: MicroBatches, forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    # Each virtual stage takes the same micro-batches (read once) through its own iterator.
    iterators = batches.chunk_iterators(len(trainer.model))
    t = trainer.cfg.train
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=trainer.model,
        num_microbatches=trainer.num_microbatches,
        seq_length=trainer.cfg.data.seq_length,
        micro_batch_size=t.micro_batch_size,
        forward_only=forward_only,
    )
    return _mean_loss(reports)


def train_step(trainer: Trainer, batches: MicroBatches):
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    loss = run_schedule(trainer, batches, forward_only=False)
    update_ok, grad_norm, _ = trainer.optimizer.step()
    if update_ok:
        trainer.scheduler.step(increment=1)
    return loss, grad_norm


@torch.no_grad()
def evaluate(trainer: Trainer) -> float | None:
    for chunk in trainer.model:
        chunk.eval()
    batches = MicroBatches(trainer.valid_data, 0, trainer.cfg.train.micro_batch_size, trainer.dp_rank,
                           trainer.dp_size)
    losses, stopped = [], False
    for _ in range(trainer.cfg.train.eval_iters):
        stopped = trainer.stop_signals.requested() is not None  # the loop stops right after
        if stopped:
            break
        losses.append(run_schedule(trainer, batches, forward_only=True))
    batches.close()
    for chunk in trainer.model:
        chunk.train()
    if stopped or losses[0] is None:  # no partial validation loss; None off the last pipeline stage
        return None
    return sum(losses) / len(losses)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------
def train(trainer: Trainer) -> dict:
    """Runs to train_iters (or exit_interval, or a stop signal) and saves a checkpoint (unless
    train.save=false); returns {iteration: loss} on the logging rank."""
    cfg, t = trainer.cfg, trainer.cfg.train
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    logger = TrainingLogger(
        t.output_dir,
        enabled=rank == world - 1,
        tensorboard=t.tensorboard,
        flops_per_token=cfg.model.counts().flops_per_token(cfg.data.seq_length, t.recompute),
        num_devices=world,
        peak_tflops=cuda_peak_tflops(t.peak_tflops),
        start_iteration=trainer.iteration,
    )
    batches = MicroBatches(trainer.train_data, trainer.iteration * t.global_batch_size, t.micro_batch_size,
                           trainer.dp_rank, trainer.dp_size)
    stop_at = t.train_iters
    if t.exit_interval:
        next_exit = (trainer.iteration // t.exit_interval + 1) * t.exit_interval
        stop_at = min(stop_at, next_exit)
    losses = {}
    for model_chunk in trainer.model:
        model_chunk.train()
    trainer.stop_signals.install()
    stopped_by = None
    while trainer.iteration < stop_at:
        stopped_by = trainer.stop_signals.requested()  # every rank agrees before the step, or none steps
        if stopped_by:
            break
        lr = base_lr(trainer.optimizer)  # the rate this step applies
        loss, grad_norm = train_step(trainer, batches)
        trainer.iteration += 1
        losses[trainer.iteration] = loss
        logger.train_step(
            trainer.iteration, loss, lr, grad_norm,
            tokens=t.global_batch_size * cfg.data.seq_length,
            expert_load=trainer.expert_balancing.latest(),
            log_now=trainer.iteration % t.log_interval == 0 or trainer.iteration == stop_at,
            total_iters=t.train_iters,
        )
        if t.eval_interval and trainer.iteration % t.eval_interval == 0:
            valid_loss = evaluate(trainer)
            if valid_loss is not None:
                logger.validation(trainer.iteration, valid_loss)
            logger.restart_window()
        if t.save and t.save_interval and trainer.iteration % t.save_interval == 0 and trainer.iteration != stop_at:
            save(trainer)
            logger.restart_window()
    checkpoint = None
    if t.save and trainer.iteration != trainer.saved_iteration:
        checkpoint = save(trainer, announce=stopped_by is None)
    logger.finish()
    trainer.stop_signals.uninstall()
    if stopped_by:
        saved = (f"saved checkpoint {checkpoint}" if checkpoint else
                 "nothing new to save" if t.save else "no checkpoint (train.save=false)")
        _print_rank0(f"stopped by {stopped_by.name} at iteration {trainer.iteration}: {saved}")
    if logger.enabled:
        if logger.writer is not None:
            print(f"TensorBoard logs: {logger.tensorboard_dir}", flush=True)
        print(f"loss curve: {logger.loss_png}", flush=True)
    return losses


def base_lr(optimizer) -> float:
    """The schedule's own rate: that of a param group without an lr multiplier (train.lr_mult),
    else of the first group."""
    groups = optimizer.param_groups
    return next((g["lr"] for g in groups if g.get("default_config", True)), groups[0]["lr"])


def save(trainer: Trainer, announce: bool = True) -> Path:
    t = trainer.cfg.train
    state = TrainState(trainer.iteration, trainer.iteration * t.global_batch_size, trainer.layout)
    hf_files = Path(t.init_from) / "hf" if t.init_from else None  # from an import-hf checkpoint
    path = save_checkpoint(t.output_dir, state, trainer.model, trainer.optimizer, trainer.scheduler,
                           trainer.cfg.to_dict(), hf_files=hf_files)
    trainer.saved_iteration = trainer.iteration
    if announce:
        _print_rank0(f"saved checkpoint {path}")
    return path


def _print_rank0(message: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(message, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_mm.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML run config (examples/configs/*.yaml)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config and its layout for --world-size ranks, print the layout, build nothing")
    parser.add_argument("--world-size", type=int, help="ranks the dry run checks for (default: WORLD_SIZE, else 1)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-4 parallel.tp=2")
    args = parser.parse_args(argv)
    if args.world_size is not None and not args.dry_run:
        parser.error("--world-size needs --dry-run (a launch takes the world size from torchrun)")
    launch = LaunchEnv.from_environ()
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            world_size = args.world_size or launch.world_size
            check_config(cfg, world_size)
            p, t, dp = cfg.parallel, cfg.train, data_parallel_size(cfg, world_size)
            print(f"dry run: config and layout valid for {world_size} rank(s) (nothing built)\n"
                  f"layout: tp {p.tp} x pp {p.pp} x cp {p.cp} x dp {dp} (ep {p.ep}, vpp {p.vpp or '-'}"
                  f"{', sequence parallel' if p.sequence_parallel else ''}); global batch {t.global_batch_size} = "
                  f"dp {dp} x {t.global_batch_size // (t.micro_batch_size * dp)} micro-batches of "
                  f"{t.micro_batch_size}", flush=True)
            return 0
        trainer = setup(cfg)
    except UserError as err:
        if torch.distributed.is_initialized() or launch.local_rank == 0:
            sys.stderr.write(f"error: {err}\n")  # one write: ranks sharing stderr do not interleave a line
            sys.stderr.flush()
        else:
            # Found before any process group: the same config and files give local rank 0 the same
            # line. torchrun stops every rank once one exits, so leaving first could silence rank 0.
            time.sleep(30)
        return 2
    try:
        train(trainer)
    finally:
        from megatron_mm.runtime import destroy_distributed

        destroy_distributed()
    return 0
