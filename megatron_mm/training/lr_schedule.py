"""The learning-rate schedule: megatron-core's OptimizerParamScheduler with warm-up counted from the
first step, built from the train section, and what a resumed run takes from a checkpoint's."""

from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_mm.config import TrainConfig


class WarmupFromFirstStep(OptimizerParamScheduler):
    """Warm-up step s (from 0) runs at lr * (s + 1) / (warmup + 1), and the decay starts from the
    peak at step `warmup` (torchtitan's linear warm-up). megatron-core's runs its first step at
    init_lr (0), so lr_warmup_iters=1 would train iteration 1 at lr 0."""

    def get_lr(self, param_group: dict) -> float:
        if self.lr_warmup_steps > 0 and self.num_steps < self.lr_warmup_steps:
            max_lr = param_group.get("max_lr", self.max_lr)
            return self.init_lr + (max_lr - self.init_lr) * (self.num_steps + 1) / (self.lr_warmup_steps + 1)
        return super().get_lr(param_group)


def build_scheduler(t: TrainConfig, optimizer) -> WarmupFromFirstStep:
    return WarmupFromFirstStep(
        optimizer,
        init_lr=0.0,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=t.lr_decay_iters or t.train_iters,
        lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.train_iters,
        wd_incr_style="constant",
        wsd_decay_steps=t.lr_wsd_decay_iters,
        lr_wsd_decay_style="linear",
        # On resume the schedule is this run's (Megatron-LM's --override-opt_param-scheduler) or, with
        # train.resume_schedule=checkpoint, the checkpoint's (--use-checkpoint-opt_param-scheduler).
        override_opt_param_scheduler=t.resume_schedule == "config",
        use_checkpoint_opt_param_scheduler=t.resume_schedule == "checkpoint",
    )


def schedule_in_force(scheduler: OptimizerParamScheduler) -> dict:
    """The train-section values of the schedule the scheduler runs (after loading a checkpoint's)."""
    return {
        "lr": scheduler.max_lr,
        "min_lr": scheduler.min_lr,
        "lr_warmup_iters": scheduler.lr_warmup_steps,
        "lr_decay_iters": scheduler.lr_decay_steps,
        "lr_decay_style": scheduler.lr_decay_style,
    }
