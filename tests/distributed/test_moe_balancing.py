"""Auxiliary-loss-free balancing works: from a router skewed towards two experts, the bias update
brings the max/mean expert load down; with the update rate at 0 the skew stays. The fused update
kernel matches megatron-core's own update."""

import json

import torch

from conftest import HERE, read_weights, torchrun

SKEWED = ["train.train_iters=20", "model.aux_loss_type=none", "model.aux_loss_coeff=0.0"]


def imbalance(tmp_path, rate: float) -> list[float]:
    out = tmp_path / f"rate_{rate}"
    torchrun(1, out, f"train.output_dir={out}", *SKEWED, f"model.expert_bias_update_rate={rate}",
             config=HERE / "tiny_deepseek.yaml", flags=["--skew-expert-bias", "0.3"])
    return json.loads((out / "expert_load.json").read_text())


def test_bias_update_flattens_a_skewed_router(tmp_path):
    balanced, untouched = imbalance(tmp_path, 0.02), imbalance(tmp_path, 0.0)
    # Top-2 of 8 experts all on experts 0 and 1 is a max/mean load of 4.
    assert balanced[0] > 3.5 and untouched[0] > 3.5
    assert sum(balanced[-5:]) / 5 < 0.6 * balanced[0], balanced
    assert min(untouched) > 0.9 * untouched[0], untouched


def test_fused_bias_update_equals_megatron_core(tmp_path):
    """The one-call csrc update of every layer's bias gives the same biases (bit for bit) and losses
    as megatron-core's own update in finalize_model_grads, here over EP2 with moving biases."""
    runs = {}
    for update in ("fused_kernel", "megatron"):
        out = tmp_path / update
        torchrun(2, out, f"train.output_dir={out}", "train.train_iters=8", "parallel.ep=2",
                 "model.expert_bias_update_rate=0.05", f"model.expert_bias_update={update}",
                 config=HERE / "tiny_deepseek.yaml", flags=["--skew-expert-bias", "0.3"])
        runs[update] = (json.loads((out / "losses.json").read_text()), read_weights(out, 0), read_weights(out, 1))
    fused, megatron = runs["fused_kernel"], runs["megatron"]
    assert fused[0] == megatron[0]
    for rank in (1, 2):
        biases = [name for name in fused[rank] if name.endswith("expert_bias")]
        assert biases and any(fused[rank][name].abs().sum() > 0 for name in biases)
        for name in biases:
            assert torch.equal(fused[rank][name], megatron[rank][name]), name


def test_capacity_factor_drops_and_reports_tokens(tmp_path):
    """Token dropping at capacity factor 1 with the router skewed onto two experts: those experts
    keep one expert's share each, the rest is dropped, and the drop count is what is missing."""
    out = tmp_path / "capacity"
    result = torchrun(1, out, f"train.output_dir={out}", "train.train_iters=2", *SKEWED[1:],
                      "model.expert_bias_update_rate=0.0", "model.capacity_factor=1.0",
                      config=HERE / "tiny_deepseek.yaml", flags=["--skew-expert-bias", "0.3"])
    # 8 sequences x 32 tokens, top-2 of 8 experts: 512 routed, capacity 64 per expert; the two
    # favoured experts keep 64 each in each of the 3 MoE layers and the MTP layer.
    dropped_lines = [line for line in result.stdout.splitlines() if "| dropped " in line]
    assert dropped_lines and all(line.endswith("| dropped 1,536") for line in dropped_lines), dropped_lines
