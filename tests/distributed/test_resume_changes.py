"""Resuming with changed settings: this run's schedule is applied (or the checkpoint's, when asked),
the log says which and what differs, and the saved config records the schedule that ran."""

import re
import shutil

import pytest
import torch
import yaml

from conftest import torchrun
from megatron_mm.config import TrainConfig
from megatron_mm.training.lr_schedule import build_scheduler

LOG_LR = re.compile(r"^iter\s+(\d+)/\d+ \| loss \S+ \| lr (\S+) ")


def logged_lrs(stdout: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for m in map(LOG_LR.match, stdout.splitlines()) if m}


def expected_lrs(train: TrainConfig, steps) -> dict[int, float]:
    """The rate each iteration applies under a fresh schedule built from `train`."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    scheduler = build_scheduler(train, optimizer)
    lrs = {}
    for iteration in range(1, max(steps) + 1):
        lrs[iteration] = optimizer.param_groups[0]["lr"]
        scheduler.step(increment=1)
    return {step: lrs[step] for step in steps}


@pytest.fixture(scope="module")
def stopped_at_3(tmp_path_factory, init_checkpoint):
    """6 planned iterations at lr 1e-3 (the tiny config's), stopped after 3."""
    out = tmp_path_factory.mktemp("stopped")
    torchrun(2, out, f"train.output_dir={out}", f"train.init_from={init_checkpoint}", "train.train_iters=6",
             "train.exit_interval=3", "parallel.tp=2")
    return out


def resume(stopped, tmp_path, *overrides):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(stopped / "checkpoints", out / "checkpoints")
    result = torchrun(2, out, f"train.output_dir={out}", "parallel.tp=2", "train.train_iters=9", "train.lr=2e-3",
                      *overrides, save=True)
    return out, result


def test_resume_applies_the_new_schedule(stopped_at_3, tmp_path):
    out, result = resume(stopped_at_3, tmp_path)
    tiny = yaml.safe_load((out / "checkpoints" / "iter_0000009" / "config.yaml").read_text())["train"]
    new_schedule = TrainConfig(**{**tiny, "train_iters": 9, "lr": 2e-3})
    expected = expected_lrs(new_schedule, range(4, 10))
    for step, lr in logged_lrs(result.stdout).items():
        assert lr == pytest.approx(expected[step], rel=1e-3), f"iteration {step}"
    assert "learning-rate schedule from this run's config (train.resume_schedule=config): lr 0.002" in result.stdout
    assert "differs from the checkpoint: train.train_iters 6 -> 9, train.exit_interval 3 -> None, " \
           "train.lr 0.001 -> 0.002" in result.stdout
    assert tiny["lr"] == 2e-3 and tiny["train_iters"] == 9


def test_resume_can_keep_the_checkpoint_schedule(stopped_at_3, tmp_path):
    out, result = resume(stopped_at_3, tmp_path, "train.resume_schedule=checkpoint")
    saved = yaml.safe_load((out / "checkpoints" / "iter_0000009" / "config.yaml").read_text())["train"]
    old_schedule = TrainConfig(**{**saved, "lr": 1e-3, "lr_decay_iters": None, "train_iters": 6})
    expected = expected_lrs(old_schedule, range(4, 7))
    logged = logged_lrs(result.stdout)
    for step in range(4, 7):
        assert logged[step] == pytest.approx(expected[step], rel=1e-3), f"iteration {step}"
    assert "learning-rate schedule from the checkpoint (train.resume_schedule=checkpoint): lr 0.001" in result.stdout
    assert saved["lr"] == 1e-3 and saved["lr_decay_iters"] == 6, "the saved config must record the schedule that ran"
