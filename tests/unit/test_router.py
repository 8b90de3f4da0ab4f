"""Fused MoE router (megatron_mm._C) against its pure-torch reference and against
megatron-core's topk_routing_with_score_function (fused=False)."""


import pytest
import torch

from megatron_mm.ops import router as ops
from megatron_mm.ops.router import route_reference

# tokens, experts, topk, num_groups, group_topk
SHAPES = [
    (0, 8, 2, None, None),  # empty batch
    (1, 1, 1, None, None),
    (3, 64, 6, None, None),  # fewer tokens than experts
    (16, 8, 8, None, None),  # topk == experts
    (257, 16, 4, None, None),
    (300, 64, 8, 8, 4),  # group-limited: top-2 of each group decides
    (200, 256, 8, 8, 4),  # DeepSeek-V3 layout
    (100, 32, 6, 4, 2),  # groups score their top-3
    (50, 16, 4, 4, 4),  # every group kept
    (64, 16, 2, 8, 1),  # one group kept
    (4000, 64, 8, None, None),  # large enough for the multi-threaded CPU path
]
MODES = [  # score_function, pre_softmax, with expert_bias
    ("softmax", False, False),
    ("softmax", True, False),
    ("sigmoid", False, False),
    ("sigmoid", False, True),
]


def kernel_route():
    """The project's install builds the extension, so its absence is a failure, not a skip."""
    try:
        from megatron_mm import _C  # noqa: F401
    except ImportError as err:
        pytest.fail(f"megatron_mm._C is not built ({err}): pip install --no-build-isolation -e .")
    assert ops.HAVE_KERNEL
    return ops.route


def random_logits(tokens, experts, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, experts, generator=gen, dtype=torch.float64).to(dtype)


def random_bias(experts, seed=0):
    gen = torch.Generator().manual_seed(seed + 100)
    return torch.randn(experts, generator=gen) * 0.1


def dense_routing(probs, indices, num_experts):
    """[T, E] probs and routing map, the form megatron-core's router returns."""
    tokens = indices.shape[0]
    dense = torch.zeros(tokens, num_experts, dtype=probs.dtype).scatter(1, indices, probs)
    routing_map = torch.zeros(tokens, num_experts, dtype=torch.bool).scatter(1, indices, True)
    return dense, routing_map


def megatron_core_route(logits, topk, score_function, expert_bias, num_groups, group_topk,
                        scaling_factor, pre_softmax):
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    return topk_routing_with_score_function(
        logits, topk, use_pre_softmax=pre_softmax, num_groups=num_groups, group_topk=group_topk,
        scaling_factor=scaling_factor, score_function=score_function, expert_bias=expert_bias,
        fused=False,
    )


def assert_routes_like_megatron_core(logits, topk, score_function, expert_bias=None,
                                     num_groups=None, group_topk=None, scaling_factor=None,
                                     pre_softmax=False):
    route = kernel_route()
    args = (topk, score_function, expert_bias, num_groups, group_topk, scaling_factor, pre_softmax)
    probs, indices, counts = route(logits, *args)
    tokens, experts = logits.shape
    assert probs.shape == indices.shape == (tokens, topk)
    assert probs.dtype == torch.float32 and indices.dtype == torch.int64
    assert counts.dtype == torch.int64 and counts.shape == (experts,)

    want_probs, want_map = megatron_core_route(logits.float(), *args)
    got_probs, got_map = dense_routing(probs, indices, experts)
    assert torch.equal(got_map, want_map), "chosen experts differ from megatron-core"
    torch.testing.assert_close(got_probs, want_probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(counts, want_map.sum(dim=0), rtol=0, atol=0)

    ref_probs, ref_indices, ref_counts = route_reference(logits, *args)
    assert torch.equal(dense_routing(ref_probs, ref_indices, experts)[1], want_map)
    torch.testing.assert_close(probs, ref_probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(counts, ref_counts, rtol=0, atol=0)
    if score_function == "softmax" or expert_bias is None:  # probs follow the selection order
        assert bool((probs[:, :-1] >= probs[:, 1:]).all())
    return probs, indices, counts


@pytest.mark.parametrize("score_function,pre_softmax,with_bias", MODES)
@pytest.mark.parametrize("tokens,experts,topk,num_groups,group_topk", SHAPES)
def test_matches_megatron_core(tokens, experts, topk, num_groups, group_topk, score_function,
                               pre_softmax, with_bias):
    logits = random_logits(tokens, experts, seed=tokens + experts + topk)
    bias = random_bias(experts, seed=experts) if with_bias else None
    assert_routes_like_megatron_core(logits, topk, score_function, bias, num_groups, group_topk,
                                     None, pre_softmax)


@pytest.mark.parametrize("score_function,pre_softmax,with_bias", MODES)
@pytest.mark.parametrize("scaling_factor", [2.5, 0.0])  # 0 means unset in megatron-core
def test_scaling_factor(score_function, pre_softmax, with_bias, scaling_factor):
    logits = random_logits(200, 64, seed=7)
    bias = random_bias(64) if with_bias else None
    probs, _, _ = assert_routes_like_megatron_core(logits, 8, score_function, bias, 8, 4,
                                                   scaling_factor, pre_softmax)
    if score_function == "sigmoid" or not pre_softmax:
        expected_sum = scaling_factor or 1.0  # normalised over the chosen experts
        torch.testing.assert_close(probs.sum(dim=1), torch.full((200,), expected_sum))


def test_expert_bias_changes_selection_but_not_probs():
    route = kernel_route()
    logits = random_logits(500, 32, seed=3)
    bias = torch.zeros(32)
    bias[[5, 17, 30]] = 1.0  # larger than any sigmoid gap: always chosen
    probs, indices, counts = assert_routes_like_megatron_core(logits, 4, "sigmoid", bias)
    unbiased_indices = route(logits, 4, "sigmoid")[1]
    assert not torch.equal(indices.sort(dim=1).values, unbiased_indices.sort(dim=1).values)
    assert counts[[5, 17, 30]].tolist() == [500, 500, 500]
    # probs are the normalised unbiased scores of the chosen experts.
    chosen = torch.sigmoid(logits).gather(1, indices)
    torch.testing.assert_close(probs, chosen / chosen.sum(dim=1, keepdim=True))


def test_bfloat16_logits_are_scored_in_float32():
    route = kernel_route()
    logits = random_logits(300, 64, seed=5).bfloat16()
    # Distinct values on a grid bfloat16 holds exactly: no ties for torch.topk to break.
    gen = torch.Generator().manual_seed(6)
    distinct = torch.stack([torch.randperm(64, generator=gen) for _ in range(300)]) / 16 - 2
    for score_function, pre_softmax, with_bias in MODES:
        bias = random_bias(64) if with_bias else None
        args = (8, score_function, bias, 8, 4, None, pre_softmax)
        got = route(logits, *args)
        want = route(logits.float(), *args)
        for actual, expected in zip(got, want):
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)
        assert_routes_like_megatron_core(distinct.bfloat16(), 8, score_function, bias,
                                         pre_softmax=pre_softmax)


def test_ties_go_to_the_lower_expert_index():
    """torch.topk breaks ties in no fixed order; the kernel picks the lowest index."""
    route = kernel_route()
    logits = torch.zeros(3, 16)
    logits[1, 9] = 1.0
    for score_function in ("softmax", "sigmoid"):
        _, indices, counts = route(logits, 3, score_function)
        assert indices.tolist() == [[0, 1, 2], [9, 0, 1], [0, 1, 2]]
        # Equal groups: the lowest group wins, so experts 0..3 (group 0) for token 0.
        _, indices, _ = route(logits, 2, score_function, num_groups=4, group_topk=1)
        assert indices.tolist() == [[0, 1], [9, 8], [0, 1]]


@pytest.mark.parametrize("score_function,pre_softmax,with_bias", MODES)
@pytest.mark.parametrize("topk,num_groups,group_topk", [(1, None, None), (3, None, None),
                                                        (4, 4, 2), (6, 6, 6)])
def test_gradcheck_float64(score_function, pre_softmax, with_bias, topk, num_groups, group_topk):
    route = kernel_route()
    # Well-separated logits: the finite differences never change the selection.
    gen = torch.Generator().manual_seed(topk)
    logits = (torch.randperm(5 * 12, generator=gen).view(5, 12).double() * 0.25 - 7.0)
    logits.requires_grad_()
    bias = random_bias(12).double() if with_bias else None
    for scaling_factor in (None, 1.7):
        assert torch.autograd.gradcheck(
            lambda z: route(z, topk, score_function, bias, num_groups, group_topk,
                            scaling_factor, pre_softmax)[0],
            (logits,),
        )


@pytest.mark.parametrize("score_function,pre_softmax,with_bias", MODES)
@pytest.mark.parametrize("tokens,experts,topk,num_groups,group_topk",
                         [(0, 8, 2, None, None), (1, 4, 1, None, None), (16, 8, 8, None, None),
                          (300, 64, 8, 8, 4), (2000, 32, 4, None, None)])
def test_gradient_matches_reference_autograd(tokens, experts, topk, num_groups, group_topk,
                                             score_function, pre_softmax, with_bias):
    route = kernel_route()
    logits = random_logits(tokens, experts, seed=tokens + 1)
    bias = random_bias(experts) if with_bias else None
    args = (topk, score_function, bias, num_groups, group_topk, 1.5, pre_softmax)
    # One upstream gradient per (token, expert), so both see the same one whatever their order.
    grad_per_expert = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(2))
    grads = []
    for route_fn in (route, route_reference):
        z = logits.clone().requires_grad_()
        probs, indices, _ = route_fn(z, *args)
        (grad,) = torch.autograd.grad(probs, z, grad_per_expert.gather(1, indices))
        grads.append(grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_bfloat16_gradient_has_the_logits_dtype():
    route = kernel_route()
    logits = random_logits(20, 16).bfloat16().requires_grad_()
    probs, _, _ = route(logits, 4, "sigmoid")
    probs.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and logits.grad.shape == (20, 16)


def test_accepts_non_contiguous_logits():
    route = kernel_route()
    logits = random_logits(64, 32, seed=4).t().contiguous().t()
    assert not logits.is_contiguous()
    got = route(logits, 4, "sigmoid", random_bias(32), 4, 2)
    want = route(logits.contiguous(), 4, "sigmoid", random_bias(32), 4, 2)
    for actual, expected in zip(got, want):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["kernel", "reference"])
def test_rejects_bad_arguments(op):
    route = kernel_route() if op == "kernel" else route_reference
    logits = random_logits(4, 8)
    with pytest.raises(ValueError, match=r"topk must be in \[1, min\(num_experts=8"):
        route(logits, 9, "softmax")
    with pytest.raises(ValueError, match="topk must be in"):
        route(logits, 0, "softmax")
    with pytest.raises(ValueError, match="score_function must be"):
        route(logits, 2, "relu")
    with pytest.raises(ValueError, match="expert_bias needs score_function='sigmoid'"):
        route(logits, 2, "softmax", torch.zeros(8))
    with pytest.raises(ValueError, match=r"expert_bias must be \[num_experts=8\]"):
        route(logits, 2, "sigmoid", torch.zeros(7))
    with pytest.raises(ValueError, match="num_groups must divide"):
        route(logits, 2, "sigmoid", num_groups=3, group_topk=1)
    with pytest.raises(ValueError, match="group_topk <= num_groups"):
        route(logits, 4, "sigmoid", num_groups=4, group_topk=1)  # 4 > 1 group of 2
    with pytest.raises(TypeError, match="float32, bfloat16 or float64"):
        route(logits.half(), 2, "softmax")
    with pytest.raises(ValueError, match=r"logits must be \[tokens, experts\]"):
        route(logits[0], 2, "softmax")
