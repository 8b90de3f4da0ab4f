"""The warning filters of our entry points: the known third-party warnings go, any other stays."""

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from megatron_mm.quiet import silence_known_warnings

ROOT = Path(__file__).resolve().parents[2]

KNOWN = [  # (message, module megatron-core or torch attributes it to)
    ("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", "megatron.core.optimizer"),
    ("Apex is not installed. Falling back to Torch Norm", "megatron.core.models.gpt.gpt_layer_specs"),
    ("full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer.",
     "megatron.core.transformer.transformer_config"),
    ("When using async grad allreduce it is recommended to set the environment variable "
     "CUDA_DEVICE_MAX_CONNECTIONS to 1 for maximum speedup", "megatron.core.tensor_parallel.layers"),
]


def _shown(message: str, category=UserWarning, module: str = "megatron.core.optimizer") -> bool:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_warnings()
        warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module)
    return bool(caught)


@pytest.mark.parametrize("message, module", KNOWN)
def test_known_warnings_are_silenced(message, module):
    assert not _shown(message, module=module)


def test_checkpoint_deprecations_are_silenced():
    assert not _shown("`load_state_dict` is deprecated and will be removed in future versions. Please use `load` "
                      "instead.", FutureWarning, "megatron.core.dist_checkpointing.strategies.torch")
    assert not _shown("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning,
                      "megatron_mm.runtime.cpu_compat")
    for verb in ("save", "load"):
        assert not _shown(f"torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to "
                          f"{verb} in a single process.", module="torch.distributed.checkpoint.utils")


def test_other_warnings_still_show():
    assert _shown("Transformer Engine and Apex are not installed", module="megatron_mm.models.llama")
    assert _shown("Apex is not installed. Falling back to Torch Norm", module="some_package.norms")
    assert _shown("full scope is deprecated", module="megatron.core.models.gpt.gpt_model")
    assert _shown("`load_state_dict` is deprecated", FutureWarning, "megatron_mm.checkpoint.dist_ckpt")
    assert _shown("Transformer Engine and Apex are not installed", DeprecationWarning)
    assert _shown("some other megatron-core warning")


def test_mock_dataset_cache_note_is_dropped_other_dataset_logs_are_kept(caplog):
    silence_known_warnings()
    logger = logging.getLogger("megatron.core.datasets.gpt_dataset")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("Unable to save MockGPTDataset indexes because path_to_cache is None")
        logger.warning("Unable to save GPTDataset indexes because path_to_cache is None")
    assert [record.getMessage() for record in caplog.records] == [
        "Unable to save GPTDataset indexes because path_to_cache is None"]


def test_entry_point_imports_megatron_core_without_warnings():
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}  # Python's defaults
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run([sys.executable, "-m", "megatron_mm.pretrain", "--help"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "--dry-run" in result.stdout
    assert result.stderr == ""
