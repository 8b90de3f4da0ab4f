"""Runs sharing a launch (driver.py --cases, conftest.run_cases) give what launches of their own
give, bit for bit: megatron-core's groups, generators and trackers are rebuilt per run. A failing
run is named, and the runs after it still run."""

import pytest
import torch

from conftest import case, read_losses, read_weights, run_cases, torchrun

LAYOUTS = {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"]}


@pytest.fixture(scope="module")
def shared(tmp_path_factory, init_checkpoint):
    """TP2, PP2, then TP2 again in one launch: each layout follows the other one."""
    runs = {}
    for name, overrides in [("tp2", LAYOUTS["tp2"]), ("pp2", LAYOUTS["pp2"]), ("tp2_after_pp2", LAYOUTS["tp2"])]:
        out = tmp_path_factory.mktemp(f"shared_{name}")
        runs[name] = case(2, out, f"train.output_dir={out}", f"train.init_from={init_checkpoint}", *overrides)
    return run_cases(runs)


@pytest.mark.parametrize("name, layout", [("pp2", "pp2"), ("tp2_after_pp2", "tp2")])
def test_shared_launch_equals_own_launch(name, layout, shared, init_checkpoint, tmp_path):
    torchrun(2, tmp_path, f"train.output_dir={tmp_path}", f"train.init_from={init_checkpoint}", *LAYOUTS[layout])
    assert read_losses(shared[name]) == read_losses(tmp_path)
    for rank in range(2):
        alone, in_shared = read_weights(tmp_path, rank), read_weights(shared[name], rank)
        assert alone.keys() == in_shared.keys()
        assert all(torch.equal(alone[key], in_shared[key]) for key in alone), f"rank {rank}"


def test_failing_run_is_named_and_the_rest_still_run(tmp_path):
    outs = {name: tmp_path / name for name in ("first", "broken", "last")}
    runs = run_cases({
        "first": case(1, outs["first"], f"train.output_dir={outs['first']}", "train.train_iters=2"),
        "broken": case(1, outs["broken"], f"train.output_dir={outs['broken']}", "parallel.tp=2"),
        "last": case(1, outs["last"], f"train.output_dir={outs['last']}", "train.train_iters=2"),
    })
    assert sorted(read_losses(runs["first"])) == sorted(read_losses(runs["last"])) == [1, 2]
    with pytest.raises(AssertionError) as failure:
        runs["broken"]
    assert f"case 2 of 3 failed: {outs['broken']}" in str(failure.value)
    assert "error: world size 1 is not divisible by tp*pp*cp = 2*1*1 = 2" in str(failure.value)
