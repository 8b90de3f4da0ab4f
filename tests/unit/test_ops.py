"""csrc kernels (megatron_mm._C) against their pure-torch references in megatron_mm.ops."""


import pytest
import torch

from megatron_mm.ops import load_balance
from megatron_mm.ops.load_balance import expert_histogram_reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.int32, torch.int64]


def compiled_expert_histogram():
    """The project's install builds the extension, so its absence is a failure, not a skip."""
    try:
        from megatron_mm import _C
    except ImportError as err:
        pytest.fail(f"megatron_mm._C is not built ({err}): pip install --no-build-isolation -e .")
    return _C.expert_histogram


def random_routing(tokens, top_k, num_experts, dtype, device, drop_fraction=0.1, seed=0):
    """Top-k routing choices: distinct experts per token, a fraction dropped to -1."""
    gen = torch.Generator().manual_seed(seed)
    choices = torch.rand(tokens, num_experts, generator=gen).argsort(dim=1)[:, :top_k]
    choices[torch.rand(tokens, top_k, generator=gen) < drop_fraction] = -1
    return choices.to(dtype=dtype, device=device)


def assert_same_counts(indices, num_experts):
    expected = expert_histogram_reference(indices, num_experts)
    actual = compiled_expert_histogram()(indices, num_experts)
    assert actual.dtype == torch.int64
    assert actual.device == indices.device
    assert actual.shape == (num_experts,)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    return actual


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,top_k,num_experts",
    [
        (0, 2, 8),  # empty batch
        (1, 1, 1),
        (3, 2, 64),  # fewer tokens than experts
        (16, 8, 8),  # top_k == num_experts
        (257, 2, 16),
        (1000, 4, 20000),  # more experts than fit a shared-memory block histogram
        (200_000, 8, 128),  # large enough for the multi-threaded CPU path
    ],
)
def test_expert_histogram_matches_reference(device, dtype, tokens, top_k, num_experts):
    indices = random_routing(tokens, top_k, num_experts, dtype, device, seed=tokens + num_experts)
    counts = assert_same_counts(indices, num_experts)
    assert int(counts.sum()) == int((indices >= 0).sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_histogram_top_k_equal_experts_counts_every_token(device, dtype):
    indices = random_routing(50, 8, 8, dtype, device, drop_fraction=0.0)
    counts = assert_same_counts(indices, 8)
    assert counts.tolist() == [50] * 8


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_histogram_all_dropped_is_zero(device, dtype):
    indices = torch.full((100, 4), -1, dtype=dtype, device=device)
    counts = assert_same_counts(indices, 16)
    assert counts.tolist() == [0] * 16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_expert_histogram_accepts_non_contiguous_input(device, dtype):
    routing = random_routing(300, 6, 32, dtype, device)
    for view in (routing[:, ::2], routing.t(), routing[::3, 1:4]):
        assert not view.is_contiguous()
        assert_same_counts(view, 32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad_value", [8, 1000, -2])
@pytest.mark.parametrize("op", ["kernel", "reference"])
def test_expert_histogram_rejects_out_of_range(device, dtype, bad_value, op):
    histogram = compiled_expert_histogram() if op == "kernel" else expert_histogram_reference
    indices = random_routing(64, 2, 8, dtype, device)
    indices[5, 1] = bad_value
    with pytest.raises(ValueError, match=r"1 indices outside \[-1, num_experts=8\)"):
        histogram(indices, 8)


@pytest.mark.parametrize("op", ["kernel", "reference"])
def test_expert_histogram_rejects_bad_arguments(op):
    histogram = compiled_expert_histogram() if op == "kernel" else expert_histogram_reference
    with pytest.raises(TypeError, match="int32 or int64"):
        histogram(torch.zeros(4, 2), 8)
    with pytest.raises(ValueError, match="num_experts must be positive"):
        histogram(torch.zeros(4, 2, dtype=torch.int64), 0)


def test_ops_front_uses_the_kernel():
    compiled_expert_histogram()
    assert load_balance.HAVE_KERNEL
    indices = random_routing(128, 2, 16, torch.int64, "cpu")
    torch.testing.assert_close(
        load_balance.expert_histogram(indices, 16), expert_histogram_reference(indices, 16)
    )
