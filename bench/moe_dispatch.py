"""MoE token dispatch on CPU: megatron_mm's fused permute + unpermute against megatron-core.

Times forward + backward of permute -> unpermute (with routing probabilities) for ours
(megatron_mm.ops.permute / unpermute) and for the named baseline, megatron-core's own
moe_utils.permute / unpermute (fused=False), on the same inputs in the same run. The floor is
the bytes the pair must move at least, over the copy bandwidth measured here with a large
torch copy:
    permute fwd     read T*H, write N*H        unpermute fwd   read N*H, write T*H
    unpermute bwd   read T*H + N*H, write N*H  permute bwd     read N*H, write T*H
(N = T * top_k rows; the [N] maps and probs are noise next to the rows.)

    python bench/moe_dispatch.py           # quick grid (default)
    python bench/moe_dispatch.py --full    # every T, H, E, dtype that fits --max-gib
"""

import argparse
import itertools

import torch
from megatron.core.transformer.moe import moe_utils

from timing import best_seconds

from megatron_mm.ops import moe_permute as ops

TOP_K = 8
FULL_GRID = dict(tokens=(4096, 16384, 32768), hidden=(1024, 4096), experts=(64, 256))
QUICK_GRID = dict(tokens=(4096, 16384), hidden=(1024, 4096), experts=(64, 256))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def copy_bandwidth(repeats, gib=1.0):
    """Bytes read + written per second by a large contiguous torch copy."""
    src = torch.ones(int(gib * 2**30) // 4)
    dst = torch.empty_like(src)
    seconds = best_seconds(lambda: dst.copy_(src), repeats)
    return 2 * src.nbytes / seconds


def make_inputs(tokens, hidden, experts, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    topk_indices = torch.rand(tokens, experts, generator=gen).topk(TOP_K, dim=1).indices
    topk_probs = torch.rand(tokens, TOP_K, generator=gen).to(dtype)
    token_rows = torch.randn(tokens, hidden, generator=gen).to(dtype)
    grad_out = torch.randn(tokens, hidden, generator=gen).to(dtype)
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool)
    routing_map.scatter_(1, topk_indices, True)
    dense_probs = torch.zeros(tokens, experts, dtype=dtype).scatter_(1, topk_indices, topk_probs)
    return token_rows, topk_indices, topk_probs, routing_map, dense_probs, grad_out


def ours_step(token_rows, topk_indices, topk_probs, experts, grad_out):
    token_rows = token_rows.detach().requires_grad_()
    topk_probs = topk_probs.detach().requires_grad_()
    permuted, permuted_probs, row_map, _ = ops.permute(token_rows, topk_indices, experts,
                                                       topk_probs)
    out = ops.unpermute(permuted, row_map, token_rows.shape[0], permuted_probs)
    out.backward(grad_out)


def megatron_step(token_rows, routing_map, dense_probs, grad_out):
    """megatron-core's dispatcher pattern: permute the tokens, weight by probs on unpermute."""
    token_rows = token_rows.detach().requires_grad_()
    dense_probs = dense_probs.detach().requires_grad_()
    permuted, _, sorted_indices = moe_utils.permute(token_rows, routing_map, fused=False)
    out = moe_utils.unpermute(permuted, sorted_indices, token_rows.shape, probs=dense_probs,
                              routing_map=routing_map, fused=False)
    out.backward(grad_out)


def floor_bytes(tokens, hidden, element_size):
    rows = tokens * TOP_K
    return (5 * rows + 4 * tokens) * hidden * element_size


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the full grid (default: quick)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-gib", type=float, default=1.0,
                        help="skip configs whose permuted rows exceed this (memory bound)")
    args = parser.parse_args()
    if not ops.HAVE_KERNEL:
        raise SystemExit("megatron_mm._C is not built: pip install --no-build-isolation -e .")

    grid = FULL_GRID if args.full else QUICK_GRID
    bandwidth = copy_bandwidth(args.repeats)
    print(f"grid: {'full' if args.full else 'quick'} {grid}, top_k={TOP_K}, "
          f"threads={torch.get_num_threads()}, permuted rows <= {args.max_gib} GiB")
    print(f"copy bandwidth (read + write): {bandwidth / 2**30:.2f} GiB/s")
    header = ("T", "H", "E", "dtype", "megatron ms", "ours ms", "speedup", "floor ms", "ours/floor")
    print(" | ".join(f"{h:>11}" for h in header))
    for tokens, hidden, experts, dtype_name in itertools.product(
        grid["tokens"], grid["hidden"], grid["experts"], DTYPES
    ):
        dtype = DTYPES[dtype_name]
        element_size = torch.empty(0, dtype=dtype).element_size()
        if tokens * TOP_K * hidden * element_size > args.max_gib * 2**30:
            print(f"{tokens:>11} | {hidden:>11} | {experts:>11} | {dtype_name:>11} | skipped "
                  f"(over --max-gib)")
            continue
        token_rows, topk_indices, topk_probs, routing_map, dense_probs, grad_out = make_inputs(
            tokens, hidden, experts, dtype
        )
        megatron_s = best_seconds(
            lambda: megatron_step(token_rows, routing_map, dense_probs, grad_out), args.repeats
        )
        ours_s = best_seconds(
            lambda: ours_step(token_rows, topk_indices, topk_probs, experts, grad_out),
            args.repeats,
        )
        floor_s = floor_bytes(tokens, hidden, element_size) / bandwidth
        row = (tokens, hidden, experts, dtype_name, f"{megatron_s * 1e3:.1f}",
               f"{ours_s * 1e3:.1f}", f"{megatron_s / ours_s:.2f}x", f"{floor_s * 1e3:.1f}",
               f"{ours_s / floor_s:.2f}")
        print(" | ".join(f"{str(v):>11}" for v in row), flush=True)


if __name__ == "__main__":
    main()
