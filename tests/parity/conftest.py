"""Helpers for the HuggingFace parity tests: tiny random models made with transformers' own config
classes, the import -> export round trip, and tools/check_hf_parity.py at a layout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4  # max logit difference relative to the largest |logit|, fp32


def tiny_hf_model(hf_config, directory: Path, seed: int = 0, noise: float = 0.1, max_shard_size="5GB") -> Path:
    """A transformers model from `hf_config`, every tensor perturbed (so that norm weights are not
    all ones and a swapped mapping cannot hide), saved as safetensors."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config).float()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * noise)
    model.save_pretrained(directory, max_shard_size=max_shard_size)
    return directory


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    from megatron_mm.checkpoint.streaming import SafetensorsReader

    reader = SafetensorsReader(directory)
    names = sorted(reader.names())
    return dict(zip(names, reader.get(names)))


def assert_round_trip(hf_dir: Path, checkpoint: Path, exported: Path) -> None:
    """export-hf of an imported checkpoint gives back every tensor bit for bit, and the config."""
    from megatron_mm.checkpoint.hf import export_hf

    export_hf(checkpoint, exported)
    original, result = hf_tensors(hf_dir), hf_tensors(exported)
    assert sorted(result) == sorted(original)
    for name, tensor in original.items():
        assert result[name].dtype == tensor.dtype, name
        assert torch.equal(result[name], tensor), name
    assert json.loads((exported / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())
    for side_file in hf_dir.iterdir():  # tokenizer and generation config come back unchanged
        if side_file.suffix != ".safetensors" and side_file.name != "config.json":
            assert (exported / side_file.name).read_bytes() == side_file.read_bytes(), side_file.name


def check_parity(hf_dir: Path, checkpoint: Path, tp: int = 1, pp: int = 1, ep: int = 1) -> float:
    """Runs tools/check_hf_parity.py; returns the relative logit difference it measured."""
    command = [sys.executable, str(ROOT / "tools" / "check_hf_parity.py"), "--hf-dir", str(hf_dir),
               "--checkpoint", str(checkpoint), "--tp", str(tp), "--pp", str(pp), "--ep", str(ep),
               "--tolerance", str(TOLERANCE)]
    env = {key: value for key, value in os.environ.items()
           if key not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    found = re.search(r"relative ([0-9.e+-]+)", result.stdout)
    assert result.returncode == 0 and found, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    print(result.stdout.strip().splitlines()[-1])
    return float(found.group(1))


@pytest.fixture
def imported(tmp_path):
    """(hf_dir, checkpoint) for a transformers config: the tiny model saved, then import-hf'd."""
    from megatron_mm.checkpoint.hf import import_hf

    def make(hf_config, **model_kwargs):
        hf_dir = tiny_hf_model(hf_config, tmp_path / "hf", **model_kwargs)
        (hf_dir / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')  # travels with the weights
        return hf_dir, import_hf(hf_dir, tmp_path / "checkpoint")

    return make
