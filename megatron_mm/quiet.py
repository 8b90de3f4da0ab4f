"""Known, harmless third-party warnings, silenced in our entry points (pretrain and the tools).

Call `silence_known_warnings()` before megatron-core is imported: several of these are raised at
import time. Each filter names one message (and, where the warning is attributed to it, the module
that raises it), so any other warning still shows.
"""

from __future__ import annotations

import logging
import warnings


def silence_known_warnings() -> None:
    # Transformer Engine and apex are optional GPU extras; megatron-core's torch fallbacks are the
    # ones our backend seam chooses (optimizer, multi-tensor ops, clip_grads, FSDP mixed precision).
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed",
                            category=UserWarning, module=r"megatron\.core\.")
    # Same fallback for the norm layers of megatron-core's layer specs (torch norms are used).
    warnings.filterwarnings("ignore", message="Apex is not installed. Falling back to Torch Norm",
                            category=UserWarning, module=r"megatron\.core\.")
    # megatron-core's own default cuda_graph_scope="full" triggers its deprecation note on every
    # TransformerConfig; we never set the field and CUDA graphs are off.
    warnings.filterwarnings("ignore", message="full scope is deprecated",
                            category=UserWarning, module=r"megatron\.core\.transformer\.transformer_config")
    # dist_checkpointing's torch strategy loads through torch.distributed.checkpoint's
    # load_state_dict and ShardedTensor; both still work in the pinned torch.
    warnings.filterwarnings("ignore", message="`load_state_dict` is deprecated", category=FutureWarning,
                            module=r"megatron\.core\.dist_checkpointing\.")
    warnings.filterwarnings("ignore", message="Please use DTensor instead and we are deprecating ShardedTensor",
                            category=FutureWarning)
    # The HF converters save and load dist-checkpoints from one process on purpose.
    warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized, "
                            "assuming the intent is to (save|load) in a single process", category=UserWarning,
                            module=r"torch\.distributed\.checkpoint\.")
    import torch

    if not torch.cuda.is_available():
        # A speed hint about CUDA work queues for TP communication overlap; without a GPU there are none.
        # On GPUs it stays: launch/slurm.sbatch sets the variable, a bare launch should too.
        warnings.filterwarnings("ignore", message="When using (async grad allreduce|sequence parallelism) it is "
                                "recommended to set the environment variable CUDA_DEVICE_MAX_CONNECTIONS",
                                category=UserWarning, module=r"megatron\.core\.tensor_parallel\.layers")
    logging.getLogger("megatron.core.datasets.gpt_dataset").addFilter(_mock_index_cache_note)


def _mock_index_cache_note(record: logging.LogRecord) -> bool:
    """Drops "Unable to save MockGPTDataset indexes": mock samples are generated, there is nothing to cache."""
    return not record.getMessage().startswith("Unable to save MockGPTDataset indexes")
