"""Logits parity between a HuggingFace model and ours, converted from it.

    python tools/check_hf_parity.py --hf-dir D [--tp T --pp P --ep E] [--tolerance 1e-4]

Converts D (import-hf, into a temporary directory unless --checkpoint names one already converted),
runs transformers' own model and ours at the asked layout on the same random tokens in fp32, prints
the max absolute logit difference and that relative to the largest |logit|, and exits 1 when the
relative difference is above the tolerance (2 when the model cannot be converted). Layouts with more
than one rank start their own ranks with torch.distributed.run.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import megatron_mm  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_mm.quiet import silence_known_warnings  # noqa: E402

silence_known_warnings()  # before megatron-core is imported: some of them are raised at import


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--checkpoint", help="an import-hf output of --hf-dir (skips the conversion)")
    for name in ("tp", "pp", "ep"):
        parser.add_argument(f"--{name}", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max relative logit difference")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_mm.checkpoint.hf import import_hf
    from megatron_mm.checkpoint.streaming import SafetensorsReader
    from megatron_mm.errors import UserError
    from megatron_mm.runtime.layout import smallest_world_size

    try:
        SafetensorsReader(args.hf_dir)  # damaged weights: one line here, not a traceback from transformers
        if args.checkpoint is None:
            with tempfile.TemporaryDirectory(prefix="hf_parity_") as tmp:
                checkpoint = import_hf(args.hf_dir, Path(tmp) / "checkpoint", args.tp, args.pp, args.ep)
                return _compare(args, checkpoint, smallest_world_size(args.tp, args.pp, args.ep))
        return _compare(args, Path(args.checkpoint), smallest_world_size(args.tp, args.pp, args.ep))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2


def _compare(args, checkpoint: Path, world: int) -> int:
    if world > 1 and "WORLD_SIZE" not in os.environ:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
                   f"--master_port={_free_port()}", __file__, *sys.argv[1:], "--checkpoint", str(checkpoint)]
        if "--checkpoint" in sys.argv[1:]:
            command = command[:-2]
        return subprocess.call(command)

    import torch

    from megatron_mm.training.hf_parity import hf_logits, logit_difference, our_logits

    vocab = _vocab_size(checkpoint)
    generator = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, vocab, (args.batch_size, args.seq_length), generator=generator)
    ours = our_logits(checkpoint, tokens, args.tp, args.pp, args.ep)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    max_abs, max_rel = logit_difference(ours, hf_logits(args.hf_dir, tokens))
    verdict = "ok" if max_rel <= args.tolerance else "FAILED"
    print(f"tp={args.tp} pp={args.pp} ep={args.ep}: max abs logit difference {max_abs:.3e}, "
          f"relative {max_rel:.3e} (tolerance {args.tolerance:.0e}): {verdict}", flush=True)
    return 0 if verdict == "ok" else 1


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _vocab_size(checkpoint: Path) -> int:
    from megatron_mm.config import load_config

    return load_config(checkpoint / "config.yaml").model.vocab_size


if __name__ == "__main__":
    sys.exit(main())
