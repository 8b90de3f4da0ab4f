"""Every CUDA source compiles with the nvcc this machine has, for A100 (sm_80) and H100/H800
(sm_90). The .cu files include no torch headers, so this needs no CUDA build of torch; running
the kernels needs a GPU and is covered by the CUDA-device cases of each kernel's tests."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CUDA_SOURCES = sorted(p.name for p in (REPO / "csrc").glob("*.cu"))


def test_every_kernel_family_has_cuda_source():
    # <name>_cuda.cu beside <name>.cpp: one extension compiles both, and equal stems would give
    # both the same object file.
    assert CUDA_SOURCES == ["expert_bias_cuda.cu", "load_balance_cuda.cu", "moe_dispatch_cuda.cu", "router_cuda.cu"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", CUDA_SOURCES)
def test_cuda_source_compiles(source, arch, tmp_path):
    result = subprocess.run(
        ["nvcc", "-c", "-O2", "-std=c++17", f"-arch={arch}", f"csrc/{source}", "-o", str(tmp_path / "k.o")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
