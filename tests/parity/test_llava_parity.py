"""LLaVA (LlavaForConditionalGeneration) against transformers' own model: tiny random models, every
tensor perturbed (a CLIP tower with a Llama decoder, a SigLIP tower with a Qwen2 decoder and tied
embeddings), imported with the conversion tool's machinery; both run in fp32 on the same two samples
(three images made by our processor, expanded placeholders). Our encoder runs only the tower layers
up to the hidden state LLaVA reads. The export gives back every tensor we keep bit for bit, zeros for
the tower tensors LLaVA never reads, and a model transformers loads from it gives the same logits."""

from __future__ import annotations

import json

import numpy
import pytest
import torch
from conftest import TOLERANCE, hf_tensors

IMAGE = 120
SEQ = 48
PATCHES = 16  # 16x16 images of 4x4 patches


def _hf_config(tower: str, language: str, tie: bool):
    from transformers import LlavaConfig

    vision = dict(model_type=f"{tower}_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, image_size=16, patch_size=4)
    text = dict(model_type=language, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, vision_feature_layer=-2,
                         vision_feature_select_strategy="default" if tower == "clip" else "full",
                         image_seq_length=PATCHES, tie_word_embeddings=tie)
    config.architectures = ["LlavaForConditionalGeneration"]
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


def _samples(tower: str) -> dict:
    """Two samples of SEQ tokens: sample 0 holds two images with text between, sample 1 one."""
    from megatron_mm.data.image_processing import FixedSizeImageProcessor

    processor = FixedSizeImageProcessor(16, tower, PATCHES)
    rng = numpy.random.default_rng(0)
    images = [rng.integers(0, 256, size, dtype=numpy.uint8) for size in ((22, 31, 3), (37, 18, 3), (16, 16, 3))]
    media = [processor(image) for image in images]
    words = lambda n: rng.integers(0, 100, n).tolist()  # noqa: E731
    rows = [words(3) + [IMAGE] * media[0][1] + words(4) + [IMAGE] * media[1][1], words(5) + [IMAGE] * media[2][1]]
    tokens = torch.tensor([row + words(SEQ - len(row)) for row in rows])
    return {"tokens": tokens, "images": torch.cat([m["images"] for m, _ in media])}


@torch.no_grad()
def _hf_logits(hf_dir, sample) -> torch.Tensor:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    return model(input_ids=sample["tokens"], pixel_values=sample["images"]).logits.float()


@pytest.mark.parametrize("tower, language, tie", [("clip", "llama", False), ("siglip", "qwen2", True)])
def test_llava_logits_match_transformers(tower, language, tie, tmp_path):
    from megatron_mm.checkpoint.hf import export_hf, import_hf
    from megatron_mm.training.hf_parity import logit_difference, our_logits
    from megatron_mm.config import load_config

    hf_dir = _tiny_model(_hf_config(tower, language, tie), tmp_path / "hf")
    checkpoint = import_hf(hf_dir, tmp_path / "checkpoint")
    model_cfg = load_config(checkpoint / "config.yaml").model
    assert model_cfg.family == "llava" and model_cfg.vision_encoder_type == tower
    assert model_cfg.vision_num_layers == 2 and model_cfg.tie_word_embeddings == tie  # LLaVA reads layer 2 of 3
    sample = _samples(tower)

    theirs = _hf_logits(hf_dir, sample)
    ours = our_logits(checkpoint, sample["tokens"], media={"images": sample["images"]})
    absolute, relative = logit_difference(ours, theirs)
    print(f"{tower} + {language}: max |logit difference| {absolute:.2e}, relative {relative:.2e}")
    assert relative < TOLERANCE
    # The images reach the logits: other pixels, other logits.
    moved = our_logits(checkpoint, sample["tokens"], media={"images": torch.zeros_like(sample["images"])})
    assert logit_difference(moved, ours)[1] > 1e-3

    exported = export_hf(checkpoint, tmp_path / "exported")
    original, result = hf_tensors(hf_dir), hf_tensors(exported)
    assert sorted(result) == sorted(original)
    unread = {name for name in original if name.startswith(("vision_tower.encoder.layers.2.", "vision_tower.head.",
                                                            "vision_tower.post_layernorm."))}
    assert len(unread) == 16 + 2 + (11 if tower == "siglip" else 0)
    assert all(torch.equal(result[name], tensor) for name, tensor in original.items() if name not in unread)
    assert all(not result[name].any() for name in unread)
    written = json.loads((exported / "config.json").read_text())
    source = json.loads((hf_dir / "config.json").read_text())
    for section in ("text_config", "vision_config"):
        assert {k: source[section].get(k) for k in written[section]} == written[section], section
    top = {k for k in written if k not in ("text_config", "vision_config", "dtype", "transformers_version")}
    assert {k: source.get(k) for k in top} == {k: written[k] for k in top}
    assert torch.equal(_hf_logits(exported, sample), theirs)  # the zeroed tensors are indeed never read


def test_unrepresentable_llava_configs_are_refused():
    from megatron_mm.checkpoint.hf_rules import HFConversionError
    from megatron_mm.models.llava import LlavaConfig

    hf = _hf_config("siglip", "qwen2", False).to_dict()
    hf.update(vision_feature_select_strategy="default", projector_hidden_act="relu", vision_feature_layer=[-2, -1])
    with pytest.raises(HFConversionError) as refused:
        LlavaConfig.from_hf_config(hf)
    for expected in ("vision_feature_select_strategy='default'", "projector_hidden_act='relu'",
                     "vision_feature_layer=[-2, -1]"):
        assert expected in str(refused.value)


def test_checkpoints_saved_before_transformers_5_name_the_tower_vision_model():
    from megatron_mm.models.llava import LlavaConfig

    hf = _hf_config("clip", "llama", False).to_dict()
    tower_names = lambda cfg: {n for rule in cfg.hf_rules() for n in rule.hf if "layers.0.mlp.fc1.w" in n}  # noqa: E731
    assert tower_names(LlavaConfig.from_hf_config(hf)) == {"vision_tower.encoder.layers.0.mlp.fc1.weight"}
    old = LlavaConfig.from_hf_config({**hf, "transformers_version": "4.45.2"})
    assert tower_names(old) == {"vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"}
