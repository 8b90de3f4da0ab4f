"""Multimodal models reproduce the single-rank loss under TP2, TP2 with sequence parallel, PP2 and
TP2xPP2 (encoders on the first stage) from the same initial weights, as test_parallel_equivalence.py
does for text: the LLaVA-style model (examples/configs/tiny_llava.yaml: CLIP ViT + MLP projector +
Llama) and the Qwen2-VL-style one (tiny_qwen2_vl.yaml: native-resolution ViT on images of several
sizes in one micro-batch, M-RoPE decoder), both on generated shape-image captions; the LLaVA-style
model with a learned-query resampler or an affine projector under TP2; and the vision-language MoE
(tiny_qwen2_vl_moe.yaml: that encoder in front of a Qwen3-MoE decoder) under EP2 and PP2. (Its
TP2+SP run differs from one rank by ~1e-4 at step 3: TP's reordered sums flip a near-tied top-k
choice of the tiny router; tensor parallelism of the encoders and of MoE decoders is covered above
and in test_moe_equivalence.py.) The audio-language model (tiny_audio_lm.yaml: Whisper-style encoder,
pooling, affine projector, Qwen2 decoder, on generated tone captions) under TP2+SP and PP2."""

from pathlib import Path

import pytest
import torch

from conftest import case, read_losses, read_weights, run_cases, torchrun
from test_parallel_equivalence import assert_same_losses

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
MODELS = {  # config, overrides
    "llava": (CONFIGS / "tiny_llava.yaml", []),
    "qwen2_vl": (CONFIGS / "tiny_qwen2_vl.yaml", []),
    "llava_resampler": (CONFIGS / "tiny_llava.yaml", ["model.projector_type=resampler", "model.resampler_num_queries=8"]),
    "llava_affine": (CONFIGS / "tiny_llava.yaml", ["model.projector_type=affine"]),
    "qwen2_vl_moe": (CONFIGS / "tiny_qwen2_vl_moe.yaml", []),
    "qwen2_audio": (CONFIGS / "tiny_audio_lm.yaml", []),
}

LAYOUTS = {
    "tp2": (2, ["parallel.tp=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pp=2"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2"]),
    "ep2": (2, ["parallel.ep=2"]),
}


DENSE_LAYOUTS = ("tp2", "tp2_sp", "pp2", "tp2_pp2")
CASES = [(model, layout) for model in ("llava", "qwen2_vl") for layout in DENSE_LAYOUTS] + [
    ("llava_resampler", "tp2"), ("llava_affine", "tp2"), ("qwen2_vl_moe", "ep2"), ("qwen2_vl_moe", "pp2"),
    ("qwen2_audio", "tp2_sp"), ("qwen2_audio", "pp2")]
RESUME = ("train.train_iters=6", "parallel.pp=2")  # the Qwen2-VL-style model, encoder on stage 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per model initial weights saved by one rank and that rank's losses, the layouts from those
    weights, and the 6 uninterrupted steps of the resume test: one launch per world size."""
    cases = {}
    for model, (config, overrides) in MODELS.items():
        init, single = tmp_path_factory.mktemp(f"{model}_init"), tmp_path_factory.mktemp(f"{model}_single")
        cases[f"{model}_init"] = case(1, init, f"train.output_dir={init}", *overrides, config=config,
                                      flags=["--save-init"])
        cases[f"{model}_single"] = case(1, single, f"train.output_dir={single}",
                                        f"train.init_from={init / 'checkpoints' / 'iter_0000000'}", *overrides,
                                        config=config)
    for model, layout in CASES:
        config, model_overrides = MODELS[model]
        nproc, overrides = LAYOUTS[layout]
        out = tmp_path_factory.mktemp(f"{model}_{layout}")
        checkpoint = cases[f"{model}_init"].out / "checkpoints" / "iter_0000000"
        cases[f"{model}_{layout}"] = case(nproc, out, f"train.output_dir={out}", f"train.init_from={checkpoint}",
                                          *model_overrides, *overrides, config=config)
    straight = tmp_path_factory.mktemp("resume_straight")
    cases["resume_straight"] = case(2, straight, f"train.output_dir={straight}", *RESUME, config=MODELS["qwen2_vl"][0])
    return run_cases(cases)


@pytest.mark.parametrize("model", MODELS)
def test_single_rank_learns(model, runs):
    losses = read_losses(runs[f"{model}_single"])
    assert losses[5] < losses[1]


@pytest.mark.parametrize("model, layout", CASES)
def test_layout_matches_single_rank(model, layout, runs):
    assert_same_losses(read_losses(runs[f"{model}_single"]), read_losses(runs[f"{model}_{layout}"]))


def test_resume_equals_uninterrupted_run(runs, tmp_path):
    """Qwen2-VL-style model at PP2 (encoder on stage 0): 6 steps straight equal 3 + stop + resume 3,
    losses and every weight bit for bit (the generated data is a function of the sample index)."""
    config, six = MODELS["qwen2_vl"][0], RESUME
    straight, halves = runs["resume_straight"], tmp_path / "halves"
    torchrun(2, halves, f"train.output_dir={halves}", *six, "train.exit_interval=3", config=config)
    torchrun(2, halves, f"train.output_dir={halves}", *six, config=config)  # resume=auto
    uninterrupted, resumed = read_losses(straight), read_losses(halves)
    assert sorted(resumed) == [4, 5, 6] and all(resumed[step] == uninterrupted[step] for step in resumed)
    for rank in range(2):
        a, b = read_weights(straight, rank), read_weights(halves, rank)
        assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
