"""Launches tests/distributed/driver.py under torchrun (gloo on CPU) and reads back what it wrote."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
TINY_CONFIG = HERE / "tiny_llama.yaml"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, out: Path, *overrides: str, config: Path = TINY_CONFIG, flags: list[str] = (),
             check: bool = True, compile: bool = False, save: bool | None = None) -> subprocess.CompletedProcess:
    """`save`: whether the run writes its checkpoints; by default only a run that asks for them (a
    save or exit interval) does: a closing dist-checkpoint costs seconds on CPU, and most runs here
    compare losses and weights only."""
    if save is None:
        save = any(o.startswith(("train.save_interval=", "train.exit_interval=")) for o in overrides)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={_free_port()}", str(HERE / "driver.py"), "--config", str(config), "--out", str(out)]
    cmd += [*flags, f"train.save={str(save).lower()}", *overrides]
    # torch.compile of megatron-core's fused helpers costs ~5 s per process on CPU and changes no
    # result; test_parallel_equivalence.py keeps one run with it on (compile=True).
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "0" if compile else "1", "OMP_NUM_THREADS": "1"}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        # Own session, output to files: a rank killed mid-save leaves dist_checkpointing's helper
        # processes behind holding inherited descriptors; the whole group is reaped afterwards.
        process = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True, env=env, start_new_session=True)
        try:
            returncode = process.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        stdout.seek(0)
        stderr.seek(0)
        result = subprocess.CompletedProcess(cmd, returncode, stdout.read(), stderr.read())
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def read_losses(out: Path) -> dict[int, float]:
    return {int(k): v for k, v in json.loads((out / "losses.json").read_text()).items()}


def read_weights(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"weights_rank{rank}.pt")


@pytest.fixture(scope="session")
def init_checkpoint(tmp_path_factory) -> Path:
    """One set of initial weights, saved by a single rank; every layout loads and reshards it."""
    out = tmp_path_factory.mktemp("init")
    torchrun(1, out, f"train.output_dir={out}", flags=["--save-init"])
    return out / "checkpoints" / "iter_0000000"


@pytest.fixture(scope="session")
def single_rank_losses(tmp_path_factory, init_checkpoint) -> dict[int, float]:
    out = tmp_path_factory.mktemp("single")
    torchrun(1, out, f"train.output_dir={out}", f"train.init_from={init_checkpoint}")
    return read_losses(out)
