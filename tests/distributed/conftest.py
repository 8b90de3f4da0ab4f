"""Launches tests/distributed/driver.py under torchrun (gloo on CPU) and reads back what it wrote:
one run per launch (torchrun), or several runs per launch (run_cases), which the tests whose runs
need no process of their own use: start-up is most of a tiny run's time."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from driver import CASE_FINISHED
from megatron_mm.runtime.distributed import free_port

HERE = Path(__file__).resolve().parent
TINY_CONFIG = HERE / "tiny_llama.yaml"


def driver_args(out: Path, *overrides: str, config: Path = TINY_CONFIG, flags: list[str] = (),
                save: bool | None = None) -> list[str]:
    """driver.py's arguments for one run. `save`: whether the run writes its checkpoints; by default
    only a run that asks for them (a save or exit interval) does: a closing dist-checkpoint costs
    seconds on CPU, and most runs here compare losses and weights only."""
    if save is None:
        save = any(o.startswith(("train.save_interval=", "train.exit_interval=")) for o in overrides)
    return ["--config", str(config), "--out", str(out), *flags, f"train.save={str(save).lower()}", *overrides]


def launch(nproc: int, driver_arguments: list[str], compile: bool = False,
           timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", str(HERE / "driver.py"), *driver_arguments]
    # torch.compile of megatron-core's fused helpers costs ~5 s per process on CPU and changes no
    # result; test_parallel_equivalence.py keeps one run with it on (compile=True).
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "0" if compile else "1", "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        # Own session, output to files: a rank killed mid-save leaves dist_checkpointing's helper
        # processes behind holding inherited descriptors; the whole group is reaped afterwards.
        process = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True, env=env, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        stdout.seek(0)
        stderr.seek(0)
        return subprocess.CompletedProcess(cmd, returncode, stdout.read(), stderr.read())


def failure_report(result: subprocess.CompletedProcess) -> str:
    return f"torchrun failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def torchrun(nproc: int, out: Path, *overrides: str, config: Path = TINY_CONFIG, flags: list[str] = (),
             check: bool = True, compile: bool = False, save: bool | None = None) -> subprocess.CompletedProcess:
    """One run in a launch of its own (for what needs its own processes: signals, crashes, resume
    across launches, error exits, printed output); see run_cases for the rest."""
    out.mkdir(parents=True, exist_ok=True)
    result = launch(nproc, driver_args(out, *overrides, config=config, flags=flags, save=save), compile)
    if check and result.returncode != 0:
        raise AssertionError(failure_report(result))
    return result


@dataclass(frozen=True)
class Case:
    """One run for run_cases: its world size and driver.py's arguments."""

    nproc: int
    out: Path
    arguments: list[str]


def case(nproc: int, out: Path, *overrides: str, config: Path = TINY_CONFIG, flags: list[str] = (),
         save: bool | None = None) -> Case:
    """torchrun()'s arguments, for a run that shares its launch."""
    return Case(nproc, out, driver_args(out, *overrides, config=config, flags=flags, save=save))


class CaseRuns:
    """Output directories of runs made by run_cases, by name. Asking for a run that did not finish
    fails with the output of the launch it failed in."""

    def __init__(self, cases: dict[str, Case]):
        self.cases = cases
        self.failures: dict[str, str] = {}

    def __getitem__(self, name: str) -> Path:
        if name in self.failures:
            raise AssertionError(f"run {name!r} failed in its shared launch: {self.failures[name]}")
        return self.cases[name].out

    def stdout(self, name: str) -> str:
        """What the run printed (every rank's lines, rank by rank)."""
        out = self[name]
        return "".join((out / f"stdout_rank{rank}.txt").read_text() for rank in range(self.cases[name].nproc))


def run_cases(cases: dict[str, Case], compile: bool = False) -> CaseRuns:
    """Runs `cases` (name -> case(...)) with one launch per world size instead of one each: the
    world sizes in order of first appearance, the cases of each in the order given (a case may use
    what an earlier one wrote). A failing case ends its launch; the cases after it get another."""
    runs = CaseRuns(cases)
    by_world_size: dict[int, list[str]] = {}
    for name, run in cases.items():
        by_world_size.setdefault(run.nproc, []).append(name)
    for nproc, pending in by_world_size.items():
        while pending:
            for name in pending:
                cases[name].out.mkdir(parents=True, exist_ok=True)
                (cases[name].out / CASE_FINISHED).unlink(missing_ok=True)
            with tempfile.NamedTemporaryFile("w", suffix=".json") as listing:
                json.dump([cases[name].arguments for name in pending], listing)
                listing.flush()
                # the time a launch of its own gets, per case
                result = launch(nproc, ["--cases", listing.name], compile, timeout=600 * len(pending))
            finished = [(cases[name].out / CASE_FINISHED).exists() for name in pending]
            if all(finished):
                if result.returncode != 0:
                    raise AssertionError(failure_report(result))
                break
            failed = finished.index(False)
            runs.failures[pending[failed]] = failure_report(result)
            pending = pending[failed + 1:]
    return runs


def read_losses(out: Path) -> dict[int, float]:
    return {int(k): v for k, v in json.loads((out / "losses.json").read_text()).items()}


def read_weights(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"weights_rank{rank}.pt")


@pytest.fixture(scope="session")
def dense_reference(tmp_path_factory) -> CaseRuns:
    """One set of initial weights, saved by a single rank (every layout loads and reshards it), and
    that rank's losses from them: one launch."""
    init, single = tmp_path_factory.mktemp("init"), tmp_path_factory.mktemp("single")
    return run_cases({
        "init": case(1, init, f"train.output_dir={init}", flags=["--save-init"]),
        "single": case(1, single, f"train.output_dir={single}",
                       f"train.init_from={init / 'checkpoints' / 'iter_0000000'}"),
    })


@pytest.fixture(scope="session")
def init_checkpoint(dense_reference) -> Path:
    return dense_reference["init"] / "checkpoints" / "iter_0000000"


@pytest.fixture(scope="session")
def single_rank_losses(dense_reference) -> dict[int, float]:
    return read_losses(dense_reference["single"])
