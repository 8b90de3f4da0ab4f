"""Auxiliary-loss-free balancing works: from a router skewed towards two experts, the bias update
brings the max/mean expert load down; with the update rate at 0 the skew stays. The fused update
kernel matches megatron-core's own update."""

import json

import pytest
import torch

from conftest import HERE, case, read_weights, run_cases

CONFIG = HERE / "tiny_deepseek.yaml"
SKEWED = ["train.train_iters=20", "model.aux_loss_type=none", "model.aux_loss_coeff=0.0"]
SKEW = ["--skew-expert-bias", "0.3"]
BIAS_UPDATES = ("fused_kernel", "megatron")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of this file from the skewed router: one launch per world size."""
    out = {name: tmp_path_factory.mktemp(name) for name in ("rate_0.02", "rate_0.0", "capacity", *BIAS_UPDATES)}
    cases = {rate: case(1, out[rate], f"train.output_dir={out[rate]}", *SKEWED,
                        f"model.expert_bias_update_rate={rate.removeprefix('rate_')}", config=CONFIG, flags=SKEW)
             for rate in ("rate_0.02", "rate_0.0")}
    cases["capacity"] = case(1, out["capacity"], f"train.output_dir={out['capacity']}", "train.train_iters=2",
                             *SKEWED[1:], "model.expert_bias_update_rate=0.0", "model.capacity_factor=1.0",
                             config=CONFIG, flags=SKEW)
    for update in BIAS_UPDATES:
        cases[update] = case(2, out[update], f"train.output_dir={out[update]}", "train.train_iters=8", "parallel.ep=2",
                             "model.expert_bias_update_rate=0.05", f"model.expert_bias_update={update}",
                             config=CONFIG, flags=SKEW)
    return run_cases(cases)


def imbalance(runs, rate: float) -> list[float]:
    return json.loads((runs[f"rate_{rate}"] / "expert_load.json").read_text())


def test_bias_update_flattens_a_skewed_router(runs):
    balanced, untouched = imbalance(runs, 0.02), imbalance(runs, 0.0)
    # Top-2 of 8 experts all on experts 0 and 1 is a max/mean load of 4.
    assert balanced[0] > 3.5 and untouched[0] > 3.5
    assert sum(balanced[-5:]) / 5 < 0.6 * balanced[0], balanced
    assert min(untouched) > 0.9 * untouched[0], untouched


def test_fused_bias_update_equals_megatron_core(runs):
    """The one-call csrc update of every layer's bias gives the same biases (bit for bit) and losses
    as megatron-core's own update in finalize_model_grads, here over EP2 with moving biases."""
    results = {}
    for update in BIAS_UPDATES:
        out = runs[update]
        results[update] = (json.loads((out / "losses.json").read_text()), read_weights(out, 0), read_weights(out, 1))
    fused, megatron = results["fused_kernel"], results["megatron"]
    assert fused[0] == megatron[0]
    for rank in (1, 2):
        biases = [name for name in fused[rank] if name.endswith("expert_bias")]
        assert biases and any(fused[rank][name].abs().sum() > 0 for name in biases)
        for name in biases:
            assert torch.equal(fused[rank][name], megatron[rank][name]), name


def test_capacity_factor_drops_and_reports_tokens(runs):
    """Token dropping at capacity factor 1 with the router skewed onto two experts: those experts
    keep one expert's share each, the rest is dropped, and the drop count is what is missing."""
    # 8 sequences x 32 tokens, top-2 of 8 experts: 512 routed, capacity 64 per expert; the two
    # favoured experts keep 64 each in each of the 3 MoE layers and the MTP layer.
    dropped_lines = [line for line in runs.stdout("capacity").splitlines() if "| dropped " in line]
    assert dropped_lines and all(line.endswith("| dropped 1,536") for line in dropped_lines), dropped_lines
