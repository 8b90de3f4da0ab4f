"""Entry point: `torchrun --nproc_per_node N -m megatron_mm.pretrain --config FILE.yaml [key=value ...]`."""

import sys

from megatron_mm.training.pretrain import main

if __name__ == "__main__":  # dist_checkpointing spawns helpers that re-import this module
    sys.exit(main())
