"""Training stages (training/stages.py) on the LLaVA-style tiny model: stage 1 (alignment) freezes
the encoder and the language model and trains only the projector, also split over two pipeline
stages (the second holds only frozen layers); a learning-rate multiplier on the projector equals
scaling the whole schedule when the projector is all that trains; a pattern no stage matches is a
config error."""

from pathlib import Path

import pytest
import torch

from conftest import case, read_losses, read_weights, run_cases, torchrun
from test_parallel_equivalence import assert_same_losses

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_llava.yaml"
STAGE1 = ["train.freeze=[encoders.image.encoder.*,language_model.*]"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Initial weights saved by one rank, stage 1 from them on one rank and on two pipeline stages,
    and the learning-rate variants: one launch per world size."""
    out = {name: tmp_path_factory.mktemp(name)
           for name in ("init", "stage1", "stage1_pp2", "multiplied", "scaled")}
    common = [f"train.init_from={out['init'] / 'checkpoints' / 'iter_0000000'}", *STAGE1]
    return run_cases({
        "init": case(1, out["init"], f"train.output_dir={out['init']}", config=CONFIG, flags=["--save-init"]),
        "stage1": case(1, out["stage1"], f"train.output_dir={out['stage1']}", *common, config=CONFIG),
        "multiplied": case(1, out["multiplied"], f"train.output_dir={out['multiplied']}", *common,
                           "train.lr_mult=[encoders.image.projector.*=10]", config=CONFIG),
        "scaled": case(1, out["scaled"], f"train.output_dir={out['scaled']}", *common, "train.lr=1.0e-2",
                       "train.min_lr=1.0e-3", config=CONFIG),
        "stage1_pp2": case(2, out["stage1_pp2"], f"train.output_dir={out['stage1_pp2']}", *common, "parallel.pp=2",
                           config=CONFIG),
    })


def test_stage1_trains_only_the_projector(runs):
    stage1 = runs["stage1"]
    before, after = torch.load(stage1 / "initial_weights_rank0.pt"), read_weights(stage1, 0)
    frozen = [n for n in before if ".encoders.image.encoder." in n or ".language_model." in n]
    trained = [n for n in before if ".encoders.image.projector." in n]
    assert frozen and trained and len(frozen) + len(trained) == len(before)
    assert all(torch.equal(before[n], after[n]) for n in frozen)
    assert all(not torch.equal(before[n], after[n]) for n in trained)
    losses = read_losses(stage1)
    assert losses[5] < losses[1]


def test_stage1_pipeline_parallel_matches_single_rank(runs):
    pipelined = runs["stage1_pp2"]
    assert_same_losses(read_losses(runs["stage1"]), read_losses(pipelined))
    last_stage = read_weights(pipelined, 1)  # language-model layers only: all frozen
    assert last_stage and all(torch.equal(last_stage[n], t)
                              for n, t in torch.load(pipelined / "initial_weights_rank1.pt").items())


def test_lr_multiplier_equals_scaling_the_schedule(runs):
    """Only the projector trains, so projector lr x10 must equal the whole schedule x10."""
    multiplied, scaled = runs["multiplied"], runs["scaled"]
    assert read_losses(multiplied) == read_losses(scaled)
    a, b = read_weights(multiplied, 0), read_weights(scaled, 0)
    assert all(torch.equal(a[n], b[n]) for n in a)
    default = runs["stage1"]  # the same run without the multiplier
    assert read_losses(default) != read_losses(multiplied)


def test_pattern_matching_on_no_stage_is_an_error_on_every_rank(tmp_path):
    """Checked across ranks: each pipeline stage holds only some names (syntax and single-rank
    pattern errors are in tests/unit/test_stages.py)."""
    result = torchrun(2, tmp_path, f"train.output_dir={tmp_path}", "parallel.pp=2", "train.lr_mult=[decoder.*=2]",
                      config=CONFIG, check=False)
    message = "train.lr_mult pattern 'decoder.*' matches no trained (unfrozen) parameter"
    assert result.returncode != 0 and result.stderr.count(message) >= 2, result.stderr[-3000:]
