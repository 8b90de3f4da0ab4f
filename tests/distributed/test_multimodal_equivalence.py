"""Multimodal models reproduce the single-rank loss under TP2, TP2 with sequence parallel, PP2 and
TP2xPP2 (encoders on the first stage) from the same initial weights, as test_parallel_equivalence.py
does for text: the LLaVA-style model (examples/configs/tiny_llava.yaml: CLIP ViT + MLP projector +
Llama) and the Qwen2-VL-style one (tiny_qwen2_vl.yaml: native-resolution ViT on images of several
sizes in one micro-batch, M-RoPE decoder), both on generated shape-image captions."""

from pathlib import Path

import pytest

from conftest import read_losses, torchrun
from test_parallel_equivalence import assert_same_losses

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
MODELS = {"llava": CONFIGS / "tiny_llava.yaml", "qwen2_vl": CONFIGS / "tiny_qwen2_vl.yaml"}

LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pp=2"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
}


@pytest.fixture(scope="module", params=list(MODELS))
def single_rank(request, tmp_path_factory) -> tuple[str, Path, dict[int, float]]:
    """(model, initial checkpoint, single-rank losses) of one model."""
    name, config = request.param, MODELS[request.param]
    init = tmp_path_factory.mktemp(f"{name}_init")
    torchrun(1, init, f"train.output_dir={init}", config=config, flags=["--save-init"])
    checkpoint = init / "checkpoints" / "iter_0000000"
    out = tmp_path_factory.mktemp(f"{name}_single")
    torchrun(1, out, f"train.output_dir={out}", f"train.init_from={checkpoint}", config=config)
    return name, checkpoint, read_losses(out)


def test_single_rank_learns(single_rank):
    _, _, losses = single_rank
    assert losses[5] < losses[1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_rank(layout, tmp_path, single_rank):
    name, checkpoint, losses = single_rank
    nproc, overrides = LAYOUTS[layout]
    torchrun(nproc, tmp_path, f"train.output_dir={tmp_path}", f"train.init_from={checkpoint}", *overrides,
             config=MODELS[name])
    assert_same_losses(losses, read_losses(tmp_path))
