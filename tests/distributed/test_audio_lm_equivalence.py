"""The Qwen2-Audio-style model (examples/configs/tiny_audio_lm.yaml: Whisper-style encoder, pooling,
linear projector, Qwen2 decoder, on generated tone captions) reproduces the single-rank loss under
TP2 with sequence parallel (the encoder's attention and MLP sharded, its convolutions replicated) and
PP2 (the encoder on the first stage), from the same initial weights."""

from pathlib import Path

import pytest

from conftest import read_losses, torchrun
from test_parallel_equivalence import assert_same_losses

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_audio_lm.yaml"
LAYOUTS = {
    "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pp=2"],
}


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """(initial checkpoint, single-rank losses)."""
    init = tmp_path_factory.mktemp("audio_init")
    torchrun(1, init, f"train.output_dir={init}", config=CONFIG, flags=["--save-init"])
    checkpoint = init / "checkpoints" / "iter_0000000"
    out = tmp_path_factory.mktemp("audio_single")
    torchrun(1, out, f"train.output_dir={out}", f"train.init_from={checkpoint}", config=CONFIG)
    return checkpoint, read_losses(out)


def test_single_rank_learns(single_rank):
    _, losses = single_rank
    assert losses[5] < losses[1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_single_rank(layout, single_rank, tmp_path):
    checkpoint, losses = single_rank
    torchrun(2, tmp_path, f"train.output_dir={tmp_path}", f"train.init_from={checkpoint}", *LAYOUTS[layout],
             config=CONFIG)
    assert_same_losses(losses, read_losses(tmp_path))
