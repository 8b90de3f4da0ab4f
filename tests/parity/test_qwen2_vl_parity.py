"""Qwen2-VL and Qwen2.5-VL (Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration)
against transformers' own models: a tiny random model, every tensor perturbed, imported with the
conversion tool's machinery; both run in fp32 on the same two samples (three images of different
sizes made by our processor, M-RoPE positions from ours for us and from transformers for it); then
the export gives back every tensor bit for bit, and a model transformers loads from it gives the same
logits. At TP2 the encoder and decoder split their heads and MLPs: the logits match one rank's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
from conftest import TOLERANCE, hf_tensors

from megatron_mm.runtime.distributed import free_port

IMAGE, VIDEO, VISION_START = 120, 121, 122
SEQ = 48


def _hf_config(variant: str, tie: bool):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
    if variant == "qwen2_vl":
        config_class, architecture = Qwen2VLConfig, "Qwen2VLForConditionalGeneration"
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4)
    else:  # windows of 16 pixels = 2x2 merged groups; layer 1 of 3 attends to whole images
        config_class, architecture = Qwen2_5_VLConfig, "Qwen2_5_VLForConditionalGeneration"
        vision = dict(depth=3, hidden_size=32, intermediate_size=40, out_hidden_size=64, num_heads=4, patch_size=4,
                      window_size=16, fullatt_block_indexes=[1])
    config = config_class(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                          vision_start_token_id=VISION_START, tie_word_embeddings=tie)
    config.architectures = [architecture]
    return config


def _tiny_model(config, directory):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).float()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.1)
    model.save_pretrained(directory)
    return directory


def _samples(model_cfg) -> dict:
    """Two samples of SEQ tokens: sample 0 holds two images with text between, sample 1 one."""
    processor = model_cfg.media_processors()["image"]
    processor.min_pixels, processor.max_pixels = 8 * 8, 8 * 8 * 24
    rng = numpy.random.default_rng(0)
    images = [rng.integers(0, 256, size, dtype=numpy.uint8) for size in ((22, 31, 3), (37, 18, 3), (30, 30, 3))]
    media = [processor(image) for image in images]
    counts = [n for _, n in media]
    words = lambda n: rng.integers(0, 100, n).tolist()  # noqa: E731
    rows = [words(3) + [VISION_START] + [IMAGE] * counts[0] + words(4) + [IMAGE] * counts[1],
            words(5) + [IMAGE] * counts[2]]
    tokens = torch.tensor([row + words(SEQ - len(row)) for row in rows])
    grids = [torch.cat([media[0][0]["image_grid_thw"], media[1][0]["image_grid_thw"]]), media[2][0]["image_grid_thw"]]
    positions = torch.stack([model_cfg.position_ids(tokens[i], {"image_grid_thw": grids[i]}) for i in range(2)])
    return {"tokens": tokens, "positions": positions.transpose(0, 1).contiguous(), "grids": [g.tolist() for g in grids],
            "media": {"pixel_values": torch.cat([m["pixel_values"] for m, _ in media]),
                      "image_grid_thw": torch.cat([m["image_grid_thw"] for m, _ in media])}}


@torch.no_grad()
def _hf_logits(hf_dir, sample) -> torch.Tensor:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    tokens = sample["tokens"]
    return model(input_ids=tokens, mm_token_type_ids=(tokens == IMAGE).int(), **sample["media"]).logits.float()


@pytest.mark.parametrize("variant, tie", [("qwen2_vl", False), ("qwen2_5_vl", True)])
def test_qwen2_vl_logits_match_transformers(variant, tie, tmp_path):
    from megatron_mm.checkpoint.hf import export_hf, import_hf
    from megatron_mm.training.hf_parity import logit_difference, our_logits
    from megatron_mm.config import load_config

    hf_dir = _tiny_model(_hf_config(variant, tie), tmp_path / "hf")
    checkpoint = import_hf(hf_dir, tmp_path / "checkpoint")
    model_cfg = load_config(checkpoint / "config.yaml").model
    assert model_cfg.family == variant and model_cfg.tie_word_embeddings == tie
    sample = _samples(model_cfg)
    assert len({tuple(g) for grids in sample["grids"] for g in grids}) == 3  # images of different sizes

    theirs = _hf_logits(hf_dir, sample)
    ours = our_logits(checkpoint, sample["tokens"], media=sample["media"], position_ids=sample["positions"])
    absolute, relative = logit_difference(ours, theirs)
    print(f"{variant}: max |logit difference| {absolute:.2e}, relative {relative:.2e}")
    assert relative < TOLERANCE
    # The images reach the logits: other pixels, other logits at and after the placeholders.
    blanked = dict(sample["media"], pixel_values=torch.zeros_like(sample["media"]["pixel_values"]))
    moved = our_logits(checkpoint, sample["tokens"], media=blanked, position_ids=sample["positions"])
    assert logit_difference(moved, ours)[1] > 1e-3

    torch.save(sample, tmp_path / "sample.pt")
    split = _tp2_logits(checkpoint, tmp_path / "sample.pt", tmp_path / "tp2.pt")
    tp_difference = logit_difference(split, ours)[1]
    print(f"{variant}: TP2 vs one rank, relative {tp_difference:.2e}")
    assert tp_difference < 1e-5

    exported = export_hf(checkpoint, tmp_path / "exported")
    original, result = hf_tensors(hf_dir), hf_tensors(exported)
    assert sorted(result) == sorted(original)
    assert all(torch.equal(result[name], tensor) for name, tensor in original.items())
    written = json.loads((exported / "config.json").read_text())
    source = json.loads((hf_dir / "config.json").read_text())
    for section in ("text_config", "vision_config"):
        assert {k: source[section].get(k) for k in written[section]} == written[section], section
    assert torch.equal(_hf_logits(exported, sample), theirs)


def _tp2_logits(checkpoint: Path, sample: Path, output: Path) -> torch.Tensor:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", __file__,
               str(checkpoint), str(sample), str(output)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return torch.load(output)


def _tp2_main(checkpoint: str, sample_path: str, output: str) -> None:
    """One of the two TP ranks (under torch.distributed.run)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from megatron_mm.training.hf_parity import our_logits

    sample = torch.load(sample_path)
    logits = our_logits(checkpoint, sample["tokens"], tp=2, media=sample["media"], position_ids=sample["positions"])
    if int(os.environ["RANK"]) == 0:
        torch.save(logits, output)


def test_unsupported_vision_activation_is_refused():
    from megatron_mm.checkpoint.hf_rules import HFConversionError
    from megatron_mm.models.qwen2_vl import Qwen2VLConfig

    hf = _hf_config("qwen2_vl", False).to_dict()
    hf["vision_config"]["hidden_act"] = "gelu"
    with pytest.raises(HFConversionError, match="vision hidden_act='gelu'"):
        Qwen2VLConfig.from_hf_config(hf)


if __name__ == "__main__":
    _tp2_main(*sys.argv[1:4])
