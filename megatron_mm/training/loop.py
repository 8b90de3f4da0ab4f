"""The training loop: one file, readable top to bottom.

    torchrun --nproc_per_node N -m megatron_mm.pretrain --config FILE.yaml [section.key=value ...]

megatron-core does the parallel work (TP/SP/PP/VPP/CP/EP, DDP, distributed optimizer, schedules,
dist_checkpointing); the task (`train.task`, training/tasks/) supplies the forward step and the
loss; training/setup.py builds the model. Losses stay on the device and are reduced over the
data-parallel group once per log interval (and once per evaluation).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_mm.checkpoint.dist_ckpt import TrainState, find_latest_checkpoint, save_checkpoint
from megatron_mm.config import Config, load_config
from megatron_mm.errors import UserError
from megatron_mm.moe.balancing import ExpertBalancing
from megatron_mm.runtime import LaunchEnv
from megatron_mm.runtime.layout import data_parallel_size
from megatron_mm.training.batches import MicroBatches, build_datasets
from megatron_mm.training.lr_schedule import schedule_in_force
from megatron_mm.training.resume import describe_resume
from megatron_mm.training.metrics import TrainingLogger, cuda_peak_tflops
from megatron_mm.training.setup import build_from_checkpoint, build_model, check_config, init_parallel, run_layout
from megatron_mm.training.stop_signals import StopSignals
from megatron_mm.training.tasks import build_task
from megatron_mm.training.tasks.base import LOSS_REPORT, Task, model_forward

# Also the loop's names for the drivers and tools that run parts of it.
__all__ = ["Trainer", "build_model", "check_config", "evaluate", "main", "model_forward", "save", "setup", "train",
           "train_step"]


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
    task: Task
    transforms: list  # the model transforms applied after build (they say how checkpoints hold them)
    stop_signals: StopSignals = field(default_factory=StopSignals)  # installed while train() runs
    iteration: int = 0
    saved_iteration: Optional[int] = None  # the iteration of the checkpoint this run last wrote or resumed

    @property
    def num_microbatches(self) -> int:
        t = self.cfg.train
        return t.global_batch_size // (t.micro_batch_size * self.dp_size)

    @property
    def layout(self) -> dict:
        return run_layout(self.cfg, self.dp_size)


# ---------------------------------------------------------------------------------------------
# set-up
# ---------------------------------------------------------------------------------------------
def setup(cfg: Config) -> Trainer:
    from megatron.core import parallel_state as ps

    tokenizer, backend = check_config(cfg, LaunchEnv.from_environ().world_size)
    init_parallel(cfg)
    t = cfg.train
    resume_from = _resume_checkpoint(t)
    built = build_from_checkpoint(cfg, backend, resume_from or t.init_from, train=True,
                                  resume=resume_from is not None)

    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    valid_samples = t.eval_iters * t.global_batch_size if t.eval_interval else 0
    train_ds, valid_ds, _ = build_datasets(cfg, tokenizer, (t.train_iters * t.global_batch_size, valid_samples, 0))
    fused_bias_update = getattr(cfg.model, "expert_bias_update", None) == "fused_kernel"  # MoE families only
    balancing = ExpertBalancing(built.chunks, built.transformer_config, fused_update=fused_bias_update)
    trainer = Trainer(cfg, built.chunks, built.optimizer, built.scheduler, built.transformer_config, train_ds,
                      valid_ds, dp_rank, dp_size, balancing, build_task(t.task), built.transforms)
    if built.resumed is not None:
        _report_resume(trainer, resume_from, built.resumed)
    elif t.init_from:
        _print_rank0(f"initialised weights from {t.init_from}")
    _wire_schedule_hooks(trainer)
    return trainer


def _resume_checkpoint(t) -> Optional[str | Path]:
    if t.resume == "auto":
        return find_latest_checkpoint(t.output_dir, warn=_print_rank0)
    return None if t.resume == "none" else t.resume


def _report_resume(trainer: Trainer, checkpoint: str | Path, state: TrainState) -> None:
    """The resumed position and schedule (model, optimizer, scheduler and data position continue)."""
    t = trainer.cfg.train
    trainer.iteration = trainer.saved_iteration = state.iteration
    schedule = schedule_in_force(trainer.scheduler)
    for line in describe_resume(checkpoint, state.iteration, trainer.cfg, schedule):
        _print_rank0(line)
    if t.resume_schedule == "checkpoint":  # so that the configs this run saves tell the truth
        for key, value in schedule.items():
            setattr(t, key, value)


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
def _loss_report(reports: list) -> Optional[torch.Tensor]:
    """This rank's [loss sum, count] of each micro-batch [micro-batches, 2], left on the device;
    None on ranks that hold no loss (not the last pipeline stage)."""
    return torch.stack([r[LOSS_REPORT] for r in reports]) if reports else None


def reduced_losses(step_reports: list[torch.Tensor]) -> list[float]:
    """The count-weighted mean loss of each step over the data-parallel group: one all-reduce and
    one host sync for all the steps given."""
    from megatron.core import parallel_state as ps

    stacked = torch.stack(step_reports)  # [steps, micro-batches, 2]
    torch.distributed.all_reduce(stacked, group=ps.get_data_parallel_group(with_context_parallel=True))
    totals = [step.sum(dim=0) for step in stacked]
    return torch.stack([total[0] / total[1].clamp(min=1) for total in totals]).tolist()


def run_schedule(trainer: Trainer, batches: MicroBatches, forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    # Each virtual stage takes the same micro-batches (read once) through its own iterator.
    iterators = batches.chunk_iterators(len(trainer.model))
    t = trainer.cfg.train
    reports = get_forward_backward_func()(
        forward_step_func=trainer.task.forward_step,
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=trainer.model,
        num_microbatches=trainer.num_microbatches,
        seq_length=trainer.cfg.data.seq_length,
        micro_batch_size=t.micro_batch_size,
        forward_only=forward_only,
    )
    return _loss_report(reports)


def train_step(trainer: Trainer, batches: MicroBatches, window: Optional[list] = None):
    """One optimizer step; returns (loss, grad_norm), the loss None off the last pipeline stage.
    Given the loop's `window` of unreduced loss reports, the step appends its own there and returns
    no loss (the loop reduces the window at once); otherwise the loss is this step's, reduced now."""
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    report = run_schedule(trainer, batches, forward_only=False)
    update_ok, grad_norm, _ = trainer.optimizer.step()
    if update_ok:
        trainer.scheduler.step(increment=1)
    if window is not None:
        window.append(report)
        return None, grad_norm
    return (None if report is None else reduced_losses([report])[0]), grad_norm


@torch.no_grad()
def evaluate(trainer: Trainer) -> float | None:
    for chunk in trainer.model:
        chunk.eval()
    batches = MicroBatches(trainer.valid_data, 0, trainer.cfg.train.micro_batch_size, trainer.dp_rank,
                           trainer.dp_size)
    reports, stopped = [], False
    for _ in range(trainer.cfg.train.eval_iters):
        stopped = trainer.stop_signals.requested() is not None  # the loop stops right after
        if stopped:
            break
        reports.append(run_schedule(trainer, batches, forward_only=True))
    batches.close()
    for chunk in trainer.model:
        chunk.train()
    if stopped or reports[0] is None:  # no partial validation loss; None off the last pipeline stage
        return None
    losses = reduced_losses(reports)
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
    window = StepWindow()
    for model_chunk in trainer.model:
        model_chunk.train()
    trainer.stop_signals.install()
    stopped_by = None
    while trainer.iteration < stop_at:
        stopped_by = trainer.stop_signals.requested()  # every rank agrees before the step, or none steps
        if stopped_by:
            break
        lr = base_lr(trainer.optimizer)  # the rate this step applies
        _, grad_norm = train_step(trainer, batches, window.reports)
        trainer.iteration += 1
        window.steps.append((trainer.iteration, lr, grad_norm))
        log_now = trainer.iteration % t.log_interval == 0 or trainer.iteration == stop_at
        evaluate_now = bool(t.eval_interval) and trainer.iteration % t.eval_interval == 0
        save_now = (t.save and t.save_interval and trainer.iteration % t.save_interval == 0
                    and trainer.iteration != stop_at)
        if log_now or evaluate_now or save_now:  # (those restart the logger's throughput window)
            _log_window(trainer, logger, window, losses, log_now)
        if evaluate_now:
            valid_loss = evaluate(trainer)
            if valid_loss is not None:
                logger.validation(trainer.iteration, valid_loss)
            logger.restart_window()
        if save_now:
            save(trainer)
            logger.restart_window()
    _log_window(trainer, logger, window, losses, log_now=False)  # the steps before a stop signal
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


@dataclass
class StepWindow:
    """The steps since the losses were last reduced: their unreduced loss reports, and
    (iteration, lr, grad norm) of each."""

    reports: list = field(default_factory=list)
    steps: list = field(default_factory=list)


def _log_window(trainer: Trainer, logger: TrainingLogger, window: StepWindow, losses: dict, log_now: bool) -> None:
    """Reduces the window's losses at once, records them in `losses` and hands each step to the
    logger (which prints the last when `log_now`)."""
    if not window.steps:
        return
    t = trainer.cfg.train
    values = reduced_losses(window.reports) if window.reports[0] is not None else [None] * len(window.steps)
    for (iteration, lr, grad_norm), loss in zip(window.steps, values):
        losses[iteration] = loss
        last = iteration == window.steps[-1][0]
        logger.train_step(
            iteration, loss, lr, grad_norm,
            tokens=t.global_batch_size * trainer.cfg.data.seq_length,
            expert_load=trainer.expert_balancing.latest() if last and log_now else None,
            log_now=last and log_now,
            total_iters=t.train_iters,
        )
    window.reports.clear()
    window.steps.clear()


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
                           trainer.cfg.to_dict(), hf_files=hf_files, transforms=trainer.transforms)
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
