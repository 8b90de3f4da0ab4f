"""Uneven pipeline stages (parallel.first_stage_layers / last_stage_layers, megatron-core's
num_layers_in_first/last_pipeline_stage) reproduce the single-rank loss of the same initial weights:
the DeepSeek-V3-shaped tiny model (MLA, a dense first layer, MoE with expert bias, MTP) with 5 layers
on PP2 as 3+2 and as 2+3. Same bar as the even layouts (test_parallel_equivalence.py, 1e-5 relative
per step in fp32); 3+2 was measured within 1e-7 of the single rank.
"""

import re

import pytest

from conftest import HERE, case, read_losses, read_weights, run_cases
from test_parallel_equivalence import assert_same_losses

CONFIG = HERE / "tiny_deepseek.yaml"
FIVE_LAYERS = "model.num_layers=5"
SPLITS = {"3+2": "parallel.first_stage_layers=3", "2+3": "parallel.last_stage_layers=3"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    init, single = tmp_path_factory.mktemp("init"), tmp_path_factory.mktemp("single")
    checkpoint = init / "checkpoints" / "iter_0000000"
    cases = {
        "init": case(1, init, f"train.output_dir={init}", FIVE_LAYERS, config=CONFIG, flags=["--save-init"]),
        "single": case(1, single, f"train.output_dir={single}", f"train.init_from={checkpoint}", FIVE_LAYERS,
                       config=CONFIG),
    }
    for name, split in SPLITS.items():
        out = tmp_path_factory.mktemp(name)
        cases[name] = case(2, out, f"train.output_dir={out}", f"train.init_from={checkpoint}", FIVE_LAYERS,
                           "parallel.pp=2", split, config=CONFIG)
    return run_cases(cases)


@pytest.mark.parametrize("split", SPLITS)
def test_uneven_split_matches_single_rank(split, runs):
    assert_same_losses(read_losses(runs["single"]), read_losses(runs[split]))


@pytest.mark.parametrize("split", SPLITS)
def test_stages_hold_the_asked_layers_and_the_last_holds_mtp(split, runs):
    expected = [int(n) for n in split.split("+")]
    held, mtp = [], []
    for rank in range(2):
        names = read_weights(runs[split], rank)
        held.append(len({m.group(1) for name in names if (m := re.match(r"chunk0\.decoder\.layers\.(\d+)\.", name))}))
        mtp.append(any(".mtp." in name for name in names))
    assert held == expected
    assert mtp == [False, True]  # megatron-core 0.16.1 builds the MTP block on the last stage
