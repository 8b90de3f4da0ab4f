"""Convert between HuggingFace checkpoints and our dist-checkpoints.

    python tools/convert_checkpoint.py import-hf --hf-dir D --output CKPT [--tp T --pp P --ep E] [--fresh-mtp]
    python tools/convert_checkpoint.py export-hf --checkpoint CKPT --output D [--dtype bf16] [--max-shard-size 5GB]

The dist-checkpoint loads at any layout (dist_checkpointing reshards on load); --tp/--pp/--ep are
checked against the model and written into CKPT/config.yaml as the layout to train at:
    torchrun --nproc_per_node N -m megatron_mm.pretrain --config CKPT/config.yaml train.init_from=CKPT ...
Both directions stream one tensor at a time.
"""

import argparse
import sys
from pathlib import Path

try:
    import megatron_mm  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_mm.quiet import silence_known_warnings  # noqa: E402

silence_known_warnings()  # before megatron-core is imported: some of them are raised at import

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True)
    to_ours = verbs.add_parser("import-hf", help="HuggingFace directory -> dist-checkpoint")
    to_ours.add_argument("--hf-dir", required=True, help="config.json + model.safetensors (or sharded + index)")
    to_ours.add_argument("--output", required=True, help="checkpoint directory to create")
    for name in ("tp", "pp", "ep"):
        to_ours.add_argument(f"--{name}", type=int, default=1, help=f"{name.upper()} size to train at")
    to_ours.add_argument("--fresh-mtp", action="store_true",
                         help="multi-token-prediction layers the config declares but the weights lack (as transformers "
                              "saves DeepSeek-V3) start freshly initialised instead of being left out")
    to_hf = verbs.add_parser("export-hf", help="dist-checkpoint (any layout) -> HuggingFace directory")
    to_hf.add_argument("--checkpoint", required=True, help="a checkpoint directory or a run's output_dir (latest)")
    to_hf.add_argument("--output", required=True, help="HuggingFace directory to create")
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), help="default: the imported model's dtype")
    to_hf.add_argument("--max-shard-size", default="5GB", help="per safetensors file, e.g. 5GB, 500MB")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_mm.checkpoint.hf import export_hf, import_hf, resolve_checkpoint
    from megatron_mm.checkpoint.streaming import parse_size
    from megatron_mm.config import load_config
    from megatron_mm.errors import UserError
    from megatron_mm.training.setup import model_transforms

    try:
        if args.verb == "import-hf":
            path = import_hf(args.hf_dir, args.output, tp=args.tp, pp=args.pp, ep=args.ep, fresh_mtp=args.fresh_mtp)
        else:
            dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
            transforms = model_transforms(load_config(resolve_checkpoint(args.checkpoint) / "config.yaml"))
            path = export_hf(args.checkpoint, args.output, dtype=dtype, max_shard_bytes=parse_size(args.max_shard_size),
                             transforms=transforms)
    except (UserError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
