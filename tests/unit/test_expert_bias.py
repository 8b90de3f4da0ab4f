"""Fused expert-bias update (megatron_mm._C) against its pure-torch reference and against
megatron-core's get_updated_expert_bias arithmetic."""


import pytest
import torch

from megatron_mm.ops import expert_bias as ops
from megatron_mm.ops.expert_bias import update_expert_bias_reference_

COUNT_DTYPES = [torch.int64, torch.int32, torch.uint8, torch.float32, torch.float64,
                torch.bfloat16]
LAYER_EXPERTS = [8, 64, 3, 256, 1, 17]  # layers with different expert counts


def kernel_update():
    """The project's install builds the extension, so its absence is a failure, not a skip."""
    try:
        from megatron_mm import _C  # noqa: F401
    except ImportError as err:
        pytest.fail(f"megatron_mm._C is not built ({err}): pip install --no-build-isolation -e .")
    assert ops.HAVE_KERNEL
    return ops.update_expert_bias_


def random_layers(dtype, seed=0, max_count=100):
    gen = torch.Generator().manual_seed(seed)
    biases = [torch.randn(e, generator=gen) * 1e-2 for e in LAYER_EXPERTS]
    counts = [torch.randint(0, max_count, (e,), generator=gen).to(dtype) for e in LAYER_EXPERTS]
    return biases, counts


def megatron_core_update(bias, counts, rate):
    """moe_utils.get_updated_expert_bias without its all-reduce (the lines after it)."""
    average_tokens = counts.sum(dim=-1, keepdim=True) / counts.shape[-1]
    offset = average_tokens - counts
    return bias + torch.sign(offset) * rate


def test_megatron_core_formula_is_the_one_reproduced():
    """Guards megatron_core_update against drift of the upstream function."""
    import inspect

    from megatron.core.transformer.moe import moe_utils

    source = inspect.getsource(moe_utils.get_updated_expert_bias)
    assert "tokens_per_expert.sum(dim=-1, keepdim=True) / tokens_per_expert.shape[-1]" in source
    assert "offset = average_tokens - tokens_per_expert" in source
    assert "expert_bias + torch.sign(offset) * expert_bias_update_rate" in source


@pytest.mark.parametrize("rate", [1e-3, 0.0, -0.5, 0.1])
@pytest.mark.parametrize("dtype", COUNT_DTYPES)
def test_matches_reference_exactly(dtype, rate):
    update = kernel_update()
    biases, counts = random_layers(dtype, seed=len(str(dtype)))
    expected = [b.clone() for b in biases]
    update_expert_bias_reference_(expected, counts, rate)
    update(biases, counts, rate)
    for actual, want in zip(biases, expected):
        torch.testing.assert_close(actual, want, rtol=0, atol=0)


@pytest.mark.parametrize("rate", [1e-3, 0.0, 0.37])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.float64])
def test_bit_exact_with_megatron_core(dtype, rate):
    update = kernel_update()
    biases, counts = random_layers(dtype, seed=3)
    expected = [megatron_core_update(b, c, rate) for b, c in zip(biases, counts)]
    update(biases, counts, rate)
    for actual, want in zip(biases, expected):
        torch.testing.assert_close(actual, want.float(), rtol=0, atol=0)


def test_bit_exact_with_megatron_core_on_large_counts():
    """Counts of a long step (sums of millions) still give torch's float32 mean."""
    update = kernel_update()
    gen = torch.Generator().manual_seed(5)
    counts = [torch.randint(0, 60_000, (256,), generator=gen).float() for _ in range(4)]
    biases = [torch.randn(256, generator=gen) for _ in range(4)]
    expected = [megatron_core_update(b, c, 1e-3) for b, c in zip(biases, counts)]
    update(biases, counts, 1e-3)
    for actual, want in zip(biases, expected):
        torch.testing.assert_close(actual, want, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["kernel", "reference"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.float64])
def test_load_equal_to_mean_keeps_bias(op, dtype):
    update = kernel_update() if op == "kernel" else update_expert_bias_reference_
    # Means 5 and 2.5 (exact): experts at the mean keep their bias, others move by rate.
    counts = [torch.tensor([5, 3, 7, 5], dtype=dtype), torch.tensor([2.5, 2.5], dtype=dtype)
              if dtype.is_floating_point else torch.tensor([4, 4], dtype=dtype),
              torch.tensor([6, 6, 6], dtype=dtype)]
    biases = [torch.tensor([0.5, 0.5, 0.5, 0.5]), torch.tensor([-1.0, 2.0]),
              torch.tensor([0.25, 0.0, -0.25])]
    update(biases, counts, 0.125)
    assert biases[0].tolist() == [0.5, 0.625, 0.375, 0.5]
    assert biases[1].tolist() == [-1.0, 2.0]
    assert biases[2].tolist() == [0.25, 0.0, -0.25]


@pytest.mark.parametrize("op", ["kernel", "reference"])
def test_rate_zero_leaves_biases_unchanged(op):
    update = kernel_update() if op == "kernel" else update_expert_bias_reference_
    biases, counts = random_layers(torch.int64, seed=9)
    before = [b.clone() for b in biases]
    update(biases, counts, 0.0)
    for actual, want in zip(biases, before):
        torch.testing.assert_close(actual, want, rtol=0, atol=0)


def test_updates_the_given_tensors_in_place():
    update = kernel_update()
    biases, counts = random_layers(torch.int64, seed=1)
    storage = [b.data_ptr() for b in biases]
    counts_before = [c.clone() for c in counts]
    expected = [megatron_core_update(b, c, 0.01) for b, c in zip(biases, counts)]
    assert update(biases, counts, 0.01) is None
    assert [b.data_ptr() for b in biases] == storage
    for actual, want in zip(biases, expected):
        torch.testing.assert_close(actual, want, rtol=0, atol=0)
    for actual, want in zip(counts, counts_before):  # counts are only read
        torch.testing.assert_close(actual, want, rtol=0, atol=0)


def test_updates_a_parameter_and_a_registered_buffer():
    """Router biases live in nn.Module buffers; the update must reach them."""
    update = kernel_update()
    module = torch.nn.Module()
    module.register_buffer("expert_bias", torch.zeros(4))
    update([module.expert_bias], [torch.tensor([1, 2, 3, 10])], 1.0)
    assert module.expert_bias.tolist() == [1.0, 1.0, 1.0, -1.0]


def test_no_layers_is_a_no_op():
    kernel_update()([], [], 1.0)
    update_expert_bias_reference_([], [], 1.0)


@pytest.mark.parametrize("op", ["kernel", "reference"])
def test_rejects_bad_arguments(op):
    update = kernel_update() if op == "kernel" else update_expert_bias_reference_
    with pytest.raises(ValueError, match="got 1 biases but 2 tokens_per_expert"):
        update([torch.zeros(4)], [torch.zeros(4), torch.zeros(4)], 1.0)
    with pytest.raises(TypeError, match="must be float32"):
        update([torch.zeros(4, dtype=torch.float64)], [torch.zeros(4)], 1.0)
    with pytest.raises(ValueError, match=r"tokens_per_expert\[0\] must have shape"):
        update([torch.zeros(4)], [torch.zeros(5)], 1.0)
    with pytest.raises(ValueError, match="contiguous non-empty"):
        update([torch.zeros(8)[::2]], [torch.zeros(4)], 1.0)
