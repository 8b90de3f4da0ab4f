"""Resume equals the uninterrupted run: bit-exact in the same layout, within tolerance when the
checkpoint is resharded to another layout; a kill -9 during a save, a SIGTERM or a damaged newest
checkpoint loses nothing."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import TINY_CONFIG, case, read_losses, read_weights, run_cases, torchrun
from megatron_mm.runtime.distributed import free_port
from test_parallel_equivalence import RELATIVE_TOLERANCE

REPO = Path(__file__).resolve().parents[2]
TEN_STEPS = ("train.train_iters=10",)
SAME_LAYOUT = ("parallel.tp=2",)


@pytest.fixture(scope="module")
def uninterrupted_and_stopped(tmp_path_factory, init_checkpoint):
    """10 uninterrupted steps at TP=2, and the same run stopped after step 5 (checkpoint saved at
    5): one launch."""
    straight, first_half = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("first_half")
    common = [f"train.init_from={init_checkpoint}", *TEN_STEPS, *SAME_LAYOUT]
    return run_cases({
        "straight": case(2, straight, f"train.output_dir={straight}", *common,
                         save=True),  # its closing checkpoint is checked below
        "first_half": case(2, first_half, f"train.output_dir={first_half}", *common, "train.exit_interval=5"),
    })


@pytest.fixture(scope="module")
def straight(uninterrupted_and_stopped):
    return uninterrupted_and_stopped["straight"]


@pytest.fixture(scope="module")
def first_half(uninterrupted_and_stopped):
    return uninterrupted_and_stopped["first_half"]


def assert_close(expected: dict, actual: dict, steps, rel_tol: float) -> None:
    for step in steps:
        rel = abs(actual[step] - expected[step]) / abs(expected[step])
        assert rel <= rel_tol, f"step {step}: {actual[step]!r} vs uninterrupted {expected[step]!r} (rel {rel:.2e})"


def test_resume_same_layout_is_bit_exact(straight, first_half):
    torchrun(2, first_half, f"train.output_dir={first_half}", *TEN_STEPS, *SAME_LAYOUT)  # resume=auto
    resumed, uninterrupted = read_losses(first_half), read_losses(straight)
    assert sorted(resumed) == list(range(6, 11))
    assert_close(uninterrupted, resumed, range(6, 11), rel_tol=0.0)
    curve = json.loads((first_half / "loss_history.json").read_text())["train_loss"]
    assert [step for step, _ in curve] == list(range(1, 11)), "the resumed run's curve lost its first half"
    for rank in range(2):
        a, b = read_weights(straight, rank), read_weights(first_half, rank)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"rank {rank} {name} differs after resume"


def test_resume_resharded_tp2_to_single_rank(straight, first_half, tmp_path):
    checkpoint = first_half / "checkpoints" / "iter_0000005"
    torchrun(1, tmp_path, f"train.output_dir={tmp_path}", f"train.resume={checkpoint}", *TEN_STEPS)
    assert_close(read_losses(straight), read_losses(tmp_path), range(6, 11), RELATIVE_TOLERANCE)


def test_resume_resharded_single_rank_to_tp2_pp2(straight, init_checkpoint, tmp_path):
    single = tmp_path / "single"
    torchrun(1, single, f"train.output_dir={single}", f"train.init_from={init_checkpoint}", *TEN_STEPS,
             "train.exit_interval=5")
    wide = tmp_path / "wide"
    torchrun(4, wide, f"train.output_dir={wide}", f"train.resume={single / 'checkpoints' / 'iter_0000005'}",
             *TEN_STEPS, "parallel.tp=2", "parallel.pp=2")
    assert_close(read_losses(straight), read_losses(wide), range(6, 11), RELATIVE_TOLERANCE)


def test_kill_during_save_keeps_previous_checkpoint(straight, init_checkpoint, tmp_path):
    result = torchrun(2, tmp_path, f"train.output_dir={tmp_path}", f"train.init_from={init_checkpoint}",
                      *TEN_STEPS, *SAME_LAYOUT, "train.save_interval=5", flags=["--kill-during-save", "10"],
                      check=False)
    assert result.returncode != 0, "the run was meant to die during its second save"
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == "iter_0000005"
    assert (root / "iter_0000010.tmp").is_dir() and not (root / "iter_0000010").exists()
    assert json.loads((root / "iter_0000005" / "train_state.json").read_text())["iteration"] == 5

    rerun = tmp_path / "rerun"
    torchrun(2, rerun, f"train.output_dir={tmp_path}", *TEN_STEPS, *SAME_LAYOUT)  # resume=auto from 5
    assert_close(read_losses(straight), read_losses(rerun), range(6, 11), rel_tol=0.0)


def test_finished_run_ends_with_a_checkpoint(straight, tmp_path, init_checkpoint):
    root = straight / "checkpoints"  # the run set neither save_interval nor exit_interval
    assert (root / "latest").read_text().strip() == "iter_0000010"
    assert json.loads((root / "iter_0000010" / "train_state.json").read_text())["iteration"] == 10
    torchrun(1, tmp_path, f"train.output_dir={tmp_path}", f"train.init_from={init_checkpoint}",
             "train.train_iters=2", "train.save=false")
    assert not (tmp_path / "checkpoints").exists()


def assert_resumes_bit_exact(straight, out, stopped_at: int) -> None:
    """The signalled run's checkpoint, resumed to 10 steps, equals the uninterrupted run."""
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == f"iter_{stopped_at:07d}"
    curve = json.loads((out / "loss_history.json").read_text())["train_loss"]
    assert [step for step, _ in curve] == list(range(1, stopped_at + 1))
    assert (out / "loss.png").is_file()
    torchrun(2, out, f"train.output_dir={out}", *TEN_STEPS, *SAME_LAYOUT)
    assert_close(read_losses(straight), read_losses(out), range(stopped_at + 1, 11), rel_tol=0.0)
    curve = json.loads((out / "loss_history.json").read_text())["train_loss"]
    assert [step for step, _ in curve] == list(range(1, 11)), "the resumed run's curve lost the signalled segment"
    for rank in range(2):
        a, b = read_weights(straight, rank), read_weights(out, rank)
        for name in a:
            assert torch.equal(a[name], b[name]), f"rank {rank} {name} differs after the signalled resume"


@pytest.mark.parametrize("in_validation", [False, True], ids=["in_step", "in_validation"])
def test_sigterm_saves_and_resumes_bit_exact(straight, init_checkpoint, tmp_path, in_validation):
    """SIGTERM reaches rank 0 only; both ranks stop after that step, save, write the curve, exit 0."""
    flags = ["--signal-at", "4"] + (["--signal-in-validation"] if in_validation else [])
    validation = ("train.eval_interval=2", "train.eval_iters=2") if in_validation else ()
    result = torchrun(2, tmp_path, f"train.output_dir={tmp_path}", f"train.init_from={init_checkpoint}",
                      *TEN_STEPS, *SAME_LAYOUT, *validation, flags=flags, save=True)
    stop_lines = [line for line in result.stdout.splitlines() if line.startswith("stopped by")]
    assert stop_lines == [f"stopped by SIGTERM at iteration 4: saved checkpoint "
                          f"{tmp_path / 'checkpoints' / 'iter_0000004'}"]
    assert sorted(read_losses(tmp_path)) == [1, 2, 3, 4]
    assert_resumes_bit_exact(straight, tmp_path, stopped_at=4)


def test_damaged_newest_checkpoint_falls_back(straight, init_checkpoint, tmp_path):
    torchrun(2, tmp_path, f"train.output_dir={tmp_path}", f"train.init_from={init_checkpoint}", *TEN_STEPS,
             *SAME_LAYOUT, "train.save_interval=5")
    newest = tmp_path / "checkpoints" / "iter_0000010"
    shard = sorted(newest.glob("*.distcp"))[-1]
    written = shard.stat().st_size
    with open(shard, "r+b") as handle:
        handle.truncate(written // 2)
    rerun = tmp_path / "rerun"
    result = torchrun(2, rerun, f"train.output_dir={tmp_path}", *TEN_STEPS, *SAME_LAYOUT)
    assert f"{shard} has {written // 2} bytes, {written} were written" in result.stdout
    assert "resuming from iter_0000005" in result.stdout
    assert_close(read_losses(straight), read_losses(rerun), range(6, 11), rel_tol=0.0)


@pytest.mark.parametrize("launcher, signum", [("torchrun", signal.SIGTERM), ("launch_script", signal.SIGUSR1)])
def test_signal_to_the_launcher_stops_the_run_with_a_checkpoint(tmp_path, launcher, signum):
    """What Slurm preemption, scancel or --signal=USR1 do: the launcher is signalled and forwards it
    to its ranks (bare torchrun forwards SIGTERM; launch/torchrun.sh also SIGUSR1)."""
    port = free_port()
    if launcher == "launch_script":
        cmd = [str(REPO / "launch" / "torchrun.sh"), str(TINY_CONFIG)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               "-m", "megatron_mm.pretrain", "--config", str(TINY_CONFIG)]
    cmd += [f"train.output_dir={tmp_path}", "parallel.tp=2", "train.train_iters=100000", "train.log_interval=1"]
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1", "NPROC": "2", "PYTHON": sys.executable,
           "MASTER_PORT": str(port)}
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
                                   start_new_session=True)
        try:
            lines = []
            for line in process.stdout:
                lines.append(line.rstrip("\n"))
                if line.startswith("iter      3/"):
                    process.send_signal(signum)
                    break
            lines += process.communicate(timeout=120)[0].splitlines()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    stops = [line for line in lines if line.startswith(f"stopped by {signum.name}")]
    assert len(stops) == 1, "\n".join(lines[-20:])
    iteration = int(re.match(rf"stopped by {signum.name} at iteration (\d+):", stops[0]).group(1))
    assert iteration >= 3
    root = tmp_path / "checkpoints"
    assert (root / "latest").read_text().strip() == f"iter_{iteration:07d}"
    curve = json.loads((tmp_path / "loss_history.json").read_text())["train_loss"]
    assert [step for step, _ in curve] == list(range(1, iteration + 1))


def test_distributed_optimizer_checkpoint_refuses_a_resume_it_cannot_restore(init_checkpoint, tmp_path):
    """Saved at DP2 with the distributed optimizer; without Apex/TE megatron-core cannot restore its
    Adam state, so resuming is one line that says how to start from the weights instead."""
    distributed = ("parallel.distributed_optimizer=true", "train.train_iters=4")
    torchrun(2, tmp_path, f"train.output_dir={tmp_path}", f"train.init_from={init_checkpoint}", *distributed,
             "train.exit_interval=2")
    checkpoint = tmp_path / "checkpoints" / "iter_0000002"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == checkpoint.name
    result = torchrun(2, tmp_path, f"train.output_dir={tmp_path}", *distributed, check=False)
    assert result.returncode != 0
    assert f"error: cannot resume {checkpoint}: without Apex or Transformer Engine" in result.stderr
    rerun = tmp_path / "from_weights"
    torchrun(2, rerun, f"train.output_dir={rerun}", f"train.init_from={checkpoint}", "train.resume=none", *distributed)
    assert sorted(read_losses(rerun)) == [1, 2, 3, 4]
