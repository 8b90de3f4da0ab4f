"""The LLaVA-style model (examples/configs/tiny_llava.yaml: CLIP ViT + projector + Llama on generated
shape-image captions) reproduces the single-rank loss under TP2, TP2 with sequence parallel, PP2 and
TP2xPP2 (encoder and projector on the first stage) from the same initial weights, as
test_parallel_equivalence.py does for text."""

from pathlib import Path

import pytest

from conftest import read_losses, torchrun
from test_parallel_equivalence import assert_same_losses

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_llava.yaml"

LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pp=2"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
}


@pytest.fixture(scope="module")
def llava_init(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llava_init")
    torchrun(1, out, f"train.output_dir={out}", config=CONFIG, flags=["--save-init"])
    return out / "checkpoints" / "iter_0000000"


@pytest.fixture(scope="module")
def llava_single(tmp_path_factory, llava_init) -> dict[int, float]:
    out = tmp_path_factory.mktemp("llava_single")
    torchrun(1, out, f"train.output_dir={out}", f"train.init_from={llava_init}", config=CONFIG)
    return read_losses(out)


def test_single_rank_learns(llava_single):
    assert llava_single[5] < llava_single[1]


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_single_rank(name, tmp_path, llava_init, llava_single):
    nproc, overrides = LAYOUTS[name]
    torchrun(nproc, tmp_path, f"train.output_dir={tmp_path}", f"train.init_from={llava_init}", *overrides,
             config=CONFIG)
    assert_same_losses(llava_single, read_losses(tmp_path))
