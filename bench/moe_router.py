"""MoE routing on CPU: megatron_mm's fused router against megatron-core's unfused one.

Times forward + backward (d probs / d logits) of sigmoid routing with an expert bias and
group-limited top-k for ours (megatron_mm.ops.route) and for the named baseline,
megatron-core's moe_utils.topk_routing_with_score_function (fused=False), on the same inputs
in the same run. Both backward passes see the same upstream gradient per (token, expert).

    python bench/moe_router.py
"""

import argparse
import itertools

import torch
from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

from timing import best_seconds

from megatron_mm.ops import router as ops

TOP_K = 8
NUM_GROUPS = 8
GROUP_TOPK = 4
SCALING_FACTOR = 2.5
GRID = dict(tokens=(4096, 16384), experts=(64, 256))


def ours_step(logits, bias, grad_dense):
    logits = logits.detach().requires_grad_()
    probs, indices, _ = ops.route(logits, TOP_K, "sigmoid", bias, NUM_GROUPS, GROUP_TOPK,
                                  SCALING_FACTOR)
    probs.backward(grad_dense.gather(1, indices))


def megatron_step(logits, bias, grad_dense):
    logits = logits.detach().requires_grad_()
    probs, routing_map = topk_routing_with_score_function(
        logits, TOP_K, num_groups=NUM_GROUPS, group_topk=GROUP_TOPK,
        scaling_factor=SCALING_FACTOR, score_function="sigmoid", expert_bias=bias, fused=False,
    )
    routing_map.sum(dim=0)  # tokens per expert, which the fused router also returns
    probs.backward(grad_dense)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not ops.HAVE_KERNEL:
        raise SystemExit("megatron_mm._C is not built: pip install --no-build-isolation -e .")

    print(f"sigmoid + expert bias, top_k={TOP_K}, groups={NUM_GROUPS} keep {GROUP_TOPK}, "
          f"float32, forward + backward, threads={torch.get_num_threads()}")
    header = ("T", "E", "megatron ms", "ours ms", "speedup")
    print(" | ".join(f"{h:>11}" for h in header))
    for tokens, experts in itertools.product(GRID["tokens"], GRID["experts"]):
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(tokens, experts, generator=gen)
        bias = torch.randn(experts, generator=gen) * 0.01
        grad_dense = torch.randn(tokens, experts, generator=gen)
        megatron_s = best_seconds(lambda: megatron_step(logits, bias, grad_dense), args.repeats)
        ours_s = best_seconds(lambda: ours_step(logits, bias, grad_dense), args.repeats)
        row = (tokens, experts, f"{megatron_s * 1e3:.2f}", f"{ours_s * 1e3:.2f}",
               f"{megatron_s / ours_s:.2f}x")
        print(" | ".join(f"{str(v):>11}" for v in row), flush=True)


if __name__ == "__main__":
    main()
