"""Resume equals the uninterrupted run: bit-exact in the same layout, within tolerance when the
checkpoint is resharded to another layout; a kill -9 during a save loses nothing."""

import json

import pytest
import torch

from conftest import read_losses, read_weights, torchrun
from test_parallel_equivalence import RELATIVE_TOLERANCE

TEN_STEPS = ("train.train_iters=10",)
SAME_LAYOUT = ("parallel.tp=2",)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, init_checkpoint):
    """10 uninterrupted steps at TP=2."""
    out = tmp_path_factory.mktemp("straight")
    torchrun(2, out, f"train.output_dir={out}", f"train.init_from={init_checkpoint}", *TEN_STEPS, *SAME_LAYOUT)
    return out


@pytest.fixture(scope="module")
def first_half(tmp_path_factory, init_checkpoint):
    """The same run stopped after step 5 (checkpoint saved at 5)."""
    out = tmp_path_factory.mktemp("first_half")
    torchrun(2, out, f"train.output_dir={out}", f"train.init_from={init_checkpoint}", *TEN_STEPS, *SAME_LAYOUT,
             "train.exit_interval=5")
    return out


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
