"""Auxiliary-loss-free balancing works: from a router skewed towards two experts, the bias update
brings the max/mean expert load down; with the update rate at 0 the skew stays."""

import json

from conftest import HERE, torchrun

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
