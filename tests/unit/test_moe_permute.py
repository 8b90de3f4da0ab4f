"""MoE permute/unpermute kernels (megatron_mm._C) against their pure-torch references and
against megatron-core's own moe_utils.permute / unpermute."""


import pytest
import torch

from megatron_mm.ops import moe_permute as ops
from megatron_mm.ops.moe_permute import permute_reference, unpermute_reference

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [  # tokens, top_k, num_experts, hidden
    (0, 2, 8, 16),  # empty batch
    (1, 1, 1, 4),
    (3, 2, 64, 8),  # fewer tokens than experts
    (16, 8, 8, 8),  # top_k == num_experts
    (257, 4, 16, 24),
    (20_000, 8, 64, 32),  # large enough for the multi-threaded CPU paths
]


def kernel_ops():
    """The project's install builds the extension, so its absence is a failure, not a skip."""
    try:
        from megatron_mm import _C  # noqa: F401
    except ImportError as err:
        pytest.fail(f"megatron_mm._C is not built ({err}): pip install --no-build-isolation -e .")
    assert ops.HAVE_KERNEL
    return ops.permute, ops.unpermute


def random_routing(tokens, top_k, num_experts, index_dtype=torch.int64, drop_fraction=0.1, seed=0):
    """Top-k routing choices: distinct experts per token, a fraction dropped to -1."""
    gen = torch.Generator().manual_seed(seed)
    choices = torch.rand(tokens, num_experts, generator=gen).argsort(dim=1)[:, :top_k]
    choices[torch.rand(tokens, top_k, generator=gen) < drop_fraction] = -1
    return choices.to(index_dtype)


def random_inputs(tokens, top_k, num_experts, hidden, dtype, seed=0, index_dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed + 1)
    routing = random_routing(tokens, top_k, num_experts, index_dtype, seed=seed)
    token_rows = torch.randn(tokens, hidden, generator=gen).to(dtype)
    probs = torch.rand(tokens, top_k, generator=gen).to(dtype)
    return token_rows, routing, probs


def tolerance(dtype):
    if dtype in (torch.float32, torch.float64):
        return dict(rtol=1e-6, atol=1e-6)
    return {}  # torch's defaults for the dtype


def permute_with_grads(permute_fn, token_rows, routing, num_experts, probs, capacity, seed):
    """Forward outputs and (d tokens, d probs) for random output gradients."""
    token_rows = token_rows.detach().requires_grad_()
    probs = probs.detach().requires_grad_()
    permuted, permuted_probs, row_map, counts = permute_fn(
        token_rows, routing, num_experts, probs, capacity
    )
    gen = torch.Generator().manual_seed(seed)
    grad_permuted = torch.randn(permuted.shape, generator=gen).to(permuted.dtype)
    grad_probs = torch.randn(permuted_probs.shape, generator=gen).to(probs.dtype)
    grads = torch.autograd.grad(
        (permuted, permuted_probs), (token_rows, probs), (grad_permuted, grad_probs),
        allow_unused=True,
    )
    outputs = (permuted.detach(), permuted_probs.detach(), row_map, counts)
    return outputs, [torch.zeros_like(x) if g is None else g for g, x in zip(grads, (token_rows, probs))]


def unpermute_with_grads(unpermute_fn, permuted, row_map, num_tokens, probs, seed):
    permuted = permuted.detach().requires_grad_()
    probs = probs.detach().requires_grad_()
    out = unpermute_fn(permuted, row_map, num_tokens, probs)
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen).to(out.dtype)
    grads = torch.autograd.grad(out, (permuted, probs), grad_out, allow_unused=True)
    return out.detach(), [torch.zeros_like(x) if g is None else g for g, x in zip(grads, (permuted, probs))]


def assert_permute_pair_matches(tokens, top_k, num_experts, hidden, dtype, capacity, seed=0,
                                index_dtype=torch.int64):
    permute, unpermute = kernel_ops()
    token_rows, routing, probs = random_inputs(tokens, top_k, num_experts, hidden, dtype, seed,
                                               index_dtype)
    got, got_grads = permute_with_grads(permute, token_rows, routing, num_experts, probs,
                                        capacity, seed)
    want, want_grads = permute_with_grads(permute_reference, token_rows, routing, num_experts,
                                          probs, capacity, seed)
    for actual, expected in zip(got, want):  # a permutation copies: exact in every dtype
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    for actual, expected in zip(got_grads, want_grads):
        torch.testing.assert_close(actual, expected, **tolerance(dtype))

    permuted, permuted_probs, row_map, _ = got
    out, out_grads = unpermute_with_grads(unpermute, permuted, row_map, tokens, permuted_probs, seed)
    ref, ref_grads = unpermute_with_grads(unpermute_reference, permuted, row_map, tokens,
                                          permuted_probs, seed)
    torch.testing.assert_close(out, ref, **tolerance(dtype))
    torch.testing.assert_close(out_grads[0], ref_grads[0], **tolerance(dtype))
    # d probs is a dot product over hidden; torch reduces it in another order.
    dot_tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(out_grads[1], ref_grads[1], **dot_tolerance)
    return got


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("tokens,top_k,num_experts,hidden", SHAPES)
def test_permute_unpermute_match_reference(tokens, top_k, num_experts, hidden, dtype):
    permuted, _, row_map, counts = assert_permute_pair_matches(
        tokens, top_k, num_experts, hidden, dtype, capacity=None, seed=tokens + num_experts
    )
    assert permuted.shape[0] == row_map.shape[0] == int(counts.sum())


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("capacity", [0, 2, 40, 10_000])  # overflow ... no overflow
@pytest.mark.parametrize("tokens,top_k,num_experts", [(0, 2, 4), (3, 2, 64), (300, 4, 8),
                                                      (20_000, 8, 64)])
def test_drop_and_pad_matches_reference(tokens, top_k, num_experts, capacity, index_dtype):
    _, _, row_map, counts = assert_permute_pair_matches(
        tokens, top_k, num_experts, 8, torch.float32, capacity, seed=capacity,
        index_dtype=index_dtype,
    )
    assert row_map.shape == (num_experts * capacity,)
    assert int((row_map >= 0).sum()) == int(counts.sum())
    assert int(counts.max()) <= capacity


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_probs_and_float32_probs(dtype):
    """Routers often keep probs in float32 while tokens are 16-bit; the output keeps the
    tokens' dtype and the probs gradient keeps the probs' dtype."""
    permute, unpermute = kernel_ops()
    token_rows, routing, probs = random_inputs(500, 4, 16, 32, dtype)
    permuted, _, row_map, _ = permute(token_rows, routing, 16)
    probs32 = torch.rand(permuted.shape[0])
    out, (grad_permuted, grad_probs) = unpermute_with_grads(unpermute, permuted, row_map, 500,
                                                            probs32, seed=3)
    ref, (ref_grad_permuted, ref_grad_probs) = unpermute_with_grads(
        unpermute_reference, permuted, row_map, 500, probs32, seed=3)
    assert out.dtype == dtype and grad_probs.dtype == torch.float32
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad_permuted, ref_grad_permuted)
    torch.testing.assert_close(grad_probs, ref_grad_probs, rtol=1e-5, atol=1e-5)


def test_accepts_non_contiguous_inputs():
    permute, unpermute = kernel_ops()
    token_rows, routing, probs = random_inputs(300, 6, 32, 16, torch.float32)
    views = (token_rows[:, ::2], routing[:, ::2], probs[:, ::2])
    assert not any(view.is_contiguous() for view in views)
    got = permute(views[0], views[1], 32, views[2])
    want = permute_reference(*views[:2], 32, views[2])
    for actual, expected in zip(got, want):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def megatron_routing(routing, probs, num_experts):
    """Dense [T, E] routing_map and probs as megatron-core's router produces them."""
    tokens = routing.shape[0]
    chosen = routing >= 0
    routing_map = torch.zeros(tokens, num_experts, dtype=torch.bool)
    dense_probs = torch.zeros(tokens, num_experts, dtype=probs.dtype)
    rows = torch.arange(tokens).unsqueeze(1).expand_as(routing)[chosen]
    routing_map[rows, routing[chosen]] = True
    dense_probs[rows, routing[chosen]] = probs[chosen]
    return routing_map, dense_probs


@pytest.mark.parametrize("tokens,top_k,num_experts", [(1, 1, 1), (3, 2, 64), (16, 8, 8),
                                                      (1000, 6, 32)])
def test_same_rows_as_megatron_core(tokens, top_k, num_experts):
    from megatron.core.transformer.moe import moe_utils

    permute, unpermute = kernel_ops()
    token_rows, routing, probs = random_inputs(tokens, top_k, num_experts, 16, torch.float32)
    routing_map, dense_probs = megatron_routing(routing, probs, num_experts)
    mc_permuted, mc_probs, mc_indices = moe_utils.permute(token_rows, routing_map, dense_probs)
    permuted, permuted_probs, row_map, _ = permute(token_rows, routing, num_experts, probs)
    torch.testing.assert_close(row_map, mc_indices, rtol=0, atol=0)
    torch.testing.assert_close(permuted, mc_permuted, rtol=0, atol=0)
    torch.testing.assert_close(permuted_probs, mc_probs, rtol=0, atol=0)

    mc_out = moe_utils.unpermute(mc_permuted, mc_indices, token_rows.shape, dense_probs,
                                 routing_map)
    torch.testing.assert_close(unpermute(permuted, row_map, tokens, permuted_probs), mc_out,
                               rtol=1e-6, atol=1e-6)


def test_drop_and_pad_same_rows_as_megatron_core():
    """megatron-core's drop-and-pad expects every expert to fill its capacity (the router
    pads the routing map); with every expert overflowing, both keep the same tokens."""
    from megatron.core.transformer.moe import moe_utils

    permute, unpermute = kernel_ops()
    tokens, top_k, num_experts, capacity = 200, 4, 8, 16
    token_rows, routing, probs = random_inputs(tokens, top_k, num_experts, 16, torch.float32)
    permuted, permuted_probs, row_map, counts = permute(token_rows, routing, num_experts, probs,
                                                        capacity)
    assert counts.tolist() == [capacity] * num_experts
    # megatron-core keeps the first `capacity` tokens of each column of its routing map.
    routing_map, dense_probs = megatron_routing(routing, probs, num_experts)
    mc_permuted, mc_probs, mc_indices = moe_utils.permute(
        token_rows, routing_map, dense_probs, num_out_tokens=num_experts * capacity,
        drop_and_pad=True,
    )
    torch.testing.assert_close(row_map, mc_indices, rtol=0, atol=0)
    torch.testing.assert_close(permuted, mc_permuted, rtol=0, atol=0)
    torch.testing.assert_close(permuted_probs, mc_probs, rtol=0, atol=0)
    kept_map = torch.zeros_like(routing_map)
    kept_map[row_map, torch.arange(num_experts).repeat_interleave(capacity)] = True
    mc_out = moe_utils.unpermute(mc_permuted, mc_indices, token_rows.shape,
                                 dense_probs * kept_map, kept_map, drop_and_pad=True)
    torch.testing.assert_close(unpermute(permuted, row_map, tokens, permuted_probs), mc_out,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("capacity", [None, 1, 3])
def test_gradcheck_float64(capacity):
    permute, unpermute = kernel_ops()
    token_rows, routing, probs = random_inputs(7, 3, 5, 4, torch.float64, seed=11)
    routing[2, 1] = -1
    token_rows.requires_grad_()
    probs.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, p: permute(x, routing, 5, p, capacity)[:2], (token_rows, probs)
    )
    permuted, permuted_probs, row_map, _ = permute(token_rows, routing, 5, probs, capacity)
    permuted = permuted.detach().requires_grad_()
    permuted_probs = permuted_probs.detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, p: unpermute(x, row_map, 7, p), (permuted, permuted_probs)
    )
    assert torch.autograd.gradcheck(lambda x: unpermute(x, row_map, 7), (permuted,))


@pytest.mark.parametrize("op", ["kernel", "reference"])
def test_rejects_bad_routing(op):
    permute_fn = kernel_ops()[0] if op == "kernel" else permute_reference
    token_rows, routing, _ = random_inputs(64, 2, 8, 4, torch.float32)
    bad = routing.clone()
    bad[5, 1] = 8
    with pytest.raises(ValueError, match=r"1 topk_indices outside \[-1, num_experts=8\)"):
        permute_fn(token_rows, bad, 8)
    bad = torch.tensor([[1, 1], [0, 1], [3, 3], [-1, -1]])
    with pytest.raises(ValueError, match="2 tokens choose the same expert more than once"):
        permute_fn(token_rows[:4], bad, 8)
    with pytest.raises(ValueError, match="num_experts must be positive"):
        permute_fn(token_rows, routing, 0)
    with pytest.raises(TypeError, match="int32 or int64"):
        permute_fn(token_rows, routing.float(), 8)


@pytest.mark.parametrize("op", ["kernel", "reference"])
def test_unpermute_rejects_bad_row_map(op):
    unpermute_fn = kernel_ops()[1] if op == "kernel" else unpermute_reference
    with pytest.raises(ValueError, match=r"1 row_map entries outside \[-1, num_tokens=4\)"):
        unpermute_fn(torch.ones(3, 2), torch.tensor([0, 4, -1]), 4)


def test_debug_checks_switch_is_read_from_the_environment():
    """MEGATRON_MM_DEBUG_CHECKS=1 turns on the value checks that cost a host sync on CUDA; CPU
    tensors are checked either way (the rejection tests above run on CPU)."""
    import os
    import subprocess
    import sys

    probe = "from megatron_mm.ops import moe_permute as m; import torch; print(m.DEBUG_CHECKS, m._checks_values(torch.zeros(1)))"
    for value, expected in (("1", "True True"), ("0", "False True")):
        env = {**os.environ, "MEGATRON_MM_DEBUG_CHECKS": value}
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == expected.split()
