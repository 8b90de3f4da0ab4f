"""Checkpoint manifests: a deleted or truncated file is named, resume=auto passes over the damaged
checkpoint to the newest intact one, and refuses in one line when none is intact."""

import json

import pytest

from megatron_mm.checkpoint.dist_ckpt import checkpoint_problem, find_latest_checkpoint, write_manifest
from megatron_mm.errors import UserError


def _checkpoint(root, iteration):
    path = root / f"iter_{iteration:07d}"
    (path / "rng").mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(b"x" * 100)
    (path / "rng" / "rank_00000.pt").write_bytes(b"y" * 10)
    write_manifest(path)
    (path / "train_state.json").write_text(json.dumps({"iteration": iteration}))
    return path


def test_intact_checkpoint_has_no_problem(tmp_path):
    path = _checkpoint(tmp_path / "checkpoints", 5)
    assert checkpoint_problem(path) is None
    assert json.loads((path / "manifest.json").read_text()) == {"__0_0.distcp": 100, "rng/rank_00000.pt": 10}


def test_deleted_and_truncated_files_are_named(tmp_path):
    root = tmp_path / "checkpoints"
    deleted, truncated = _checkpoint(root, 5), _checkpoint(root, 6)
    (deleted / "rng" / "rank_00000.pt").unlink()
    (truncated / "__0_0.distcp").write_bytes(b"x" * 40)
    assert checkpoint_problem(deleted) == f"{deleted / 'rng' / 'rank_00000.pt'} is missing"
    assert checkpoint_problem(truncated) == f"{truncated / '__0_0.distcp'} has 40 bytes, 100 were written"


def test_resume_auto_falls_back_to_the_newest_intact(tmp_path):
    root = tmp_path / "checkpoints"
    _checkpoint(root, 5)
    intact = _checkpoint(root, 10)
    damaged = _checkpoint(root, 15)
    (damaged / "__0_0.distcp").unlink()
    (root / "latest").write_text(damaged.name)
    warnings = []
    assert find_latest_checkpoint(tmp_path, warn=warnings.append) == intact
    assert warnings == [f"damaged checkpoint passed over ({damaged / '__0_0.distcp'} is missing): "
                        f"resuming from {intact.name}"]


def test_no_intact_checkpoint_is_one_line(tmp_path):
    root = tmp_path / "checkpoints"
    only = _checkpoint(root, 5)
    (only / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(UserError) as err:
        find_latest_checkpoint(tmp_path)
    assert "\n" not in str(err.value) and str(only / "__0_0.distcp") in str(err.value)
