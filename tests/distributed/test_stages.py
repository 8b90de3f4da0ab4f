"""Training stages (training/stages.py) on the LLaVA-style tiny model: stage 1 (alignment) freezes
the encoder and the language model and trains only the projector, also split over two pipeline
stages (the second holds only frozen layers); a learning-rate multiplier on the projector equals
scaling the whole schedule when the projector is all that trains; a pattern no stage matches is a
config error."""

from pathlib import Path

import pytest
import torch

from conftest import read_losses, read_weights, torchrun
from test_parallel_equivalence import assert_same_losses

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_llava.yaml"
STAGE1 = ["train.freeze=[encoders.image.encoder.*,language_model.*]"]


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stages_init")
    torchrun(1, out, f"train.output_dir={out}", config=CONFIG, flags=["--save-init"])
    return out / "checkpoints" / "iter_0000000"


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, init_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("stage1")
    torchrun(1, out, f"train.output_dir={out}", f"train.init_from={init_checkpoint}", *STAGE1, config=CONFIG)
    return out


def test_stage1_trains_only_the_projector(stage1):
    before, after = torch.load(stage1 / "initial_weights_rank0.pt"), read_weights(stage1, 0)
    frozen = [n for n in before if ".encoders.image.encoder." in n or ".language_model." in n]
    trained = [n for n in before if ".encoders.image.projector." in n]
    assert frozen and trained and len(frozen) + len(trained) == len(before)
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in trained)
    losses = read_losses(stage1)
    assert losses[5] < losses[1]


def test_stage1_pipeline_parallel_matches_single_rank(stage1, init_checkpoint, tmp_path):
    torchrun(2, tmp_path, f"train.output_dir={tmp_path}", f"train.init_from={init_checkpoint}", *STAGE1,
             "parallel.pp=2", config=CONFIG)
    assert_same_losses(read_losses(stage1), read_losses(tmp_path))
    last_stage = read_weights(tmp_path, 1)  # language-model layers only: all frozen
    assert last_stage and all(torch.equal(last_stage[n], t)
                              for n, t in torch.load(tmp_path / "initial_weights_rank1.pt").items())


def test_lr_multiplier_equals_scaling_the_schedule(init_checkpoint, tmp_path):
    """Only the projector trains, so projector lr x10 must equal the whole schedule x10."""
    multiplied, scaled = tmp_path / "multiplied", tmp_path / "scaled"
    common = [f"train.init_from={init_checkpoint}", *STAGE1]
    torchrun(1, multiplied, f"train.output_dir={multiplied}", *common, "train.lr_mult=[encoders.image.projector.*=10]",
             config=CONFIG)
    torchrun(1, scaled, f"train.output_dir={scaled}", *common, "train.lr=1.0e-2", "train.min_lr=1.0e-3", config=CONFIG)
    assert read_losses(multiplied) == read_losses(scaled)
    a, b = read_weights(multiplied, 0), read_weights(scaled, 0)
    assert all(torch.equal(a[n], b[n]) for n in a)
    default = tmp_path / "default"
    torchrun(1, default, f"train.output_dir={default}", *common, config=CONFIG)
    assert read_losses(default) != read_losses(multiplied)


def test_pattern_matching_on_no_stage_is_an_error_on_every_rank(tmp_path):
    """Checked across ranks: each pipeline stage holds only some names (syntax and single-rank
    pattern errors are in tests/unit/test_stages.py)."""
    result = torchrun(2, tmp_path, f"train.output_dir={tmp_path}", "parallel.pp=2", "train.lr_mult=[decoder.*=2]",
                      config=CONFIG, check=False)
    message = "train.lr_mult pattern 'decoder.*' matches no trained (unfrozen) parameter"
    assert result.returncode != 0 and result.stderr.count(message) >= 2, result.stderr[-3000:]
