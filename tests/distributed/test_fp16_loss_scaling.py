"""train.precision=fp16: fp16 weights and activations under megatron-core's Float16Module, fp32 main
params in the optimizer and its dynamic loss scaler (OptimizerConfig fp16, set from train.megatron).

At one rank from the shared initial weights, with train.megatron.initial_loss_scale=4096, the 5-step
losses stay within 2e-3 relative of fp32: fp16 rounds each activation to ~4.9e-4 relative (11-bit
mantissa) and the loss is one average over many of them, so a few roundoffs are the most a correct
run can drift in 5 steps (measured ~1e-5); a wrong scale or a lost update shows at 1e-2 and beyond.
With megatron-core's default initial scale (2^32) the first steps overflow and are skipped, which
shows the scaler is in the loop.
"""

import pytest

from conftest import case, read_losses, run_cases

FP16_TOLERANCE = 2e-3


@pytest.fixture(scope="module")
def fp16_runs(tmp_path_factory, init_checkpoint):
    scaled, default = tmp_path_factory.mktemp("fp16_scaled"), tmp_path_factory.mktemp("fp16_default")
    common = [f"train.init_from={init_checkpoint}", "train.precision=fp16"]
    return run_cases({
        "scaled": case(1, scaled, f"train.output_dir={scaled}", *common, "train.megatron.initial_loss_scale=4096"),
        "default": case(1, default, f"train.output_dir={default}", *common),
    })


def test_fp16_with_loss_scaling_tracks_fp32(fp16_runs, single_rank_losses):
    fp16 = read_losses(fp16_runs["scaled"])
    for step, loss in single_rank_losses.items():
        assert abs(fp16[step] - loss) / loss < FP16_TOLERANCE, (step, fp16[step], loss)
    assert fp16 != single_rank_losses  # it really ran in fp16


def test_default_initial_scale_skips_overflowing_steps(fp16_runs):
    assert "grad norm skipped (fp16 overflow)" in fp16_runs.stdout("default")
