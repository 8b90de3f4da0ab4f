"""Entry point: `torchrun --nproc_per_node N -m megatron_mm.pretrain --config FILE.yaml [key=value ...]`."""

import sys

from megatron_mm.quiet import silence_known_warnings

silence_known_warnings()  # before megatron-core is imported: some of them are raised at import

from megatron_mm.training.loop import main  # noqa: E402

if __name__ == "__main__":  # dist_checkpointing spawns helpers that re-import this module
    sys.exit(main())
