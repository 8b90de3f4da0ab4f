"""Every parallel layout reproduces the single-rank loss of the same initial weights.

The weights come from one checkpoint saved by a single rank and resharded on load, so the layouts
differ only in how megatron-core splits the work. fp32 on CPU: at these shapes TP2, PP2 and TP2xPP2
were inspected and are bit-identical to the single rank; the bar is 1e-5 relative per step over 5
optimizer steps, leaving room for reduction-order differences (TP all-reduces partial sums).
"""

import pytest

from conftest import case, read_losses, read_weights, run_cases, torchrun

RELATIVE_TOLERANCE = 1e-5

LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "vpp2": (2, ["parallel.pp=2", "parallel.vpp=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "dp2_distopt": (2, ["parallel.distributed_optimizer=true"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "full_recompute": (1, ["train.recompute=full"]),
    "selective_recompute_tp2": (2, ["parallel.tp=2", "train.recompute=selective"]),
}


def assert_same_losses(expected: dict, actual: dict, tolerance: float = RELATIVE_TOLERANCE) -> None:
    assert sorted(actual) == sorted(expected) == list(range(1, 6))
    for step, loss in expected.items():
        rel = abs(actual[step] - loss) / abs(loss)
        assert rel < tolerance, f"step {step}: {actual[step]!r} vs single rank {loss!r} (rel {rel:.2e})"


# Runs from the initial weights besides LAYOUTS, sharing their launches: (ranks, overrides, driver flags).
OTHER_RUNS = {
    "bf16_tp2": (2, ["parallel.tp=2", "train.precision=bf16"], []),
    "vpp2_batched_p2p": (2, ["parallel.pp=2", "parallel.vpp=2"], ["--force-batch-p2p"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, init_checkpoint):
    """Every run of this file but the compiled one: one launch per world size."""
    cases = {}
    from_init = {name: (nproc, overrides, []) for name, (nproc, overrides) in LAYOUTS.items()} | OTHER_RUNS
    for name, (nproc, overrides, flags) in from_init.items():
        out = tmp_path_factory.mktemp(name)
        cases[name] = case(nproc, out, f"train.output_dir={out}", f"train.init_from={init_checkpoint}", *overrides,
                           flags=flags)
    other_seed = tmp_path_factory.mktemp("other_seed")
    cases["other_seed"] = case(1, other_seed, f"train.output_dir={other_seed}", "train.seed=99")
    return run_cases(cases)


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_single_rank(name, runs, single_rank_losses):
    assert_same_losses(single_rank_losses, read_losses(runs[name]))


def test_losses_decrease_and_differ_from_other_weights(single_rank_losses, runs):
    """Guards the comparison itself: training moves the loss, and other weights give other losses."""
    assert single_rank_losses[5] < single_rank_losses[1]
    other = read_losses(runs["other_seed"])
    assert abs(other[1] - single_rank_losses[1]) / single_rank_losses[1] > 1e-4


def test_torch_compile_path_matches(tmp_path, init_checkpoint, single_rank_losses):
    """megatron-core's jit_fuser (torch.compile) on, as users run it: same losses as the eager path."""
    torchrun(1, tmp_path, f"train.output_dir={tmp_path}", f"train.init_from={init_checkpoint}", compile=True)
    assert_same_losses(single_rank_losses, read_losses(tmp_path))


def test_gloo_pp2_batched_p2p_trap_is_guarded(runs, single_rank_losses):
    """With two pipeline ranks, gloo mis-pairs megatron-core's batched send/recv: forcing batching
    back on (bypassing runtime.batch_p2p_comm_safe) gives a silently wrong loss, which is exactly
    what the guarded vpp2 run above does not."""
    with pytest.raises(AssertionError, match="vs single rank"):
        assert_same_losses(single_rank_losses, read_losses(runs["vpp2_batched_p2p"]))


def test_bf16_mixed_precision_tracks_fp32(runs, single_rank_losses):
    """The GPU precision path (bf16 weights and activations, fp32 main params and grads in the
    optimizer, Float16Module) on TP2: within bf16's ~3 significant digits of the fp32 run."""
    bf16 = read_losses(runs["bf16_tp2"])
    for step, loss in single_rank_losses.items():
        assert abs(bf16[step] - loss) / loss < 2e-2, (step, bf16[step], loss)
    assert bf16 != single_rank_losses  # it really ran in bf16
    # The trained weights start from the loaded ones, not from the optimizer's copy of the random init.
    for rank in range(2):
        trained_bf16, trained_fp32 = read_weights(runs["bf16_tp2"], rank), read_weights(runs["tp2"], rank)
        for name, weight in trained_fp32.items():
            if weight.is_floating_point() and weight.numel() > 1 and weight.std() > 0:  # not the norms' ones
                # Independent random inits would differ by ~1.4x the mean magnitude; bf16 by a few percent.
                scale = weight.float().abs().mean().item()
                difference = (trained_bf16[name].float() - weight.float()).abs().mean().item()
                assert difference <= 0.1 * scale, f"rank {rank} {name}: {difference:.3g} vs scale {scale:.3g}"
