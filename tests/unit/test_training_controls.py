"""The warm-up's first steps and the stop-signal handler."""

import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_mm.config import TrainConfig
from megatron_mm.training.lr_schedule import build_scheduler


def applied_lrs(train: TrainConfig, steps: int) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    scheduler = build_scheduler(train, optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=1)
    return lrs


def test_one_warmup_iteration_does_not_run_at_lr_zero():
    assert applied_lrs(TrainConfig(lr=1e-3, lr_warmup_iters=1, lr_decay_style="constant"), 3) == [5e-4, 1e-3, 1e-3]


def test_warmup_rises_to_the_peak_where_the_decay_starts():
    lrs = applied_lrs(TrainConfig(lr=1e-3, min_lr=0.0, lr_warmup_iters=4, lr_decay_style="linear", train_iters=9), 9)
    assert lrs == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3, 8e-4, 6e-4, 4e-4, 2e-4])


SIGNAL_TWICE = textwrap.dedent("""
    import os, signal, sys, time
    from megatron_mm.training import stop_signals
    handler = stop_signals.StopSignals().install()
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # a launcher's duplicate: the same request
    print("after duplicate", handler.requested().name, flush=True)
    time.sleep(stop_signals.REPEAT_GRACE_S + 0.2)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    print("not reached", flush=True)
""")


def test_a_second_signal_exits_at_once():
    result = subprocess.run([sys.executable, "-c", SIGNAL_TWICE], capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines() == ["after duplicate SIGTERM"]
    assert result.stderr.strip() == "second SIGINT: exiting without saving"
    assert result.returncode == 128 + 2
