"""The multimodal model (models/multimodal.py) through the LLaVA-style family (models/llava.py,
models/vision.py) on one process.

Config, validation and the generated image-caption samples are checked in this process. The model
checks build megatron-core modules, which needs torch.distributed and the CPU patches of
runtime/cpu_compat.py; they run in a fresh Python process (this file as a script) so that neither
leaks into other tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch

from megatron_mm.config import ConfigError, load_config
from megatron_mm.runtime.layout import validate_layout

TINY_LLAVA = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_llava.yaml"


def test_config_is_a_llama_language_model_plus_a_vision_encoder():
    from megatron_mm.models.llama import LlamaConfig
    from megatron_mm.models.llava import LlavaConfig

    cfg = load_config(TINY_LLAVA)
    assert isinstance(cfg.model, LlavaConfig) and isinstance(cfg.model, LlamaConfig)
    vision = cfg.model.vision()
    assert (vision.image_size, vision.patch_size, vision.num_layers) == (32, 8, 2)
    assert cfg.model.num_image_embeddings == 16  # (32/8)^2 patches, class token dropped
    total, embedding = cfg.model.num_parameters()
    assert total > embedding > 0


def test_llama_hf_architecture_still_maps_to_llama():
    from megatron_mm.models.llama import LlamaConfig
    from megatron_mm.models.registry import family_for_hf_architecture

    assert family_for_hf_architecture({"architectures": ["LlamaForCausalLM"]}) is LlamaConfig


@pytest.mark.parametrize("world, overrides, message", [
    (2, ["parallel.tp=2", "model.vision_num_attention_heads=3", "model.vision_hidden_size=48"],
     "vision num_attention_heads=3 is not divisible by parallel.tp=2"),
    (1, ["model.vision_patch_size=40"], "vision image_size=32 is smaller than patch_size=40"),
    (2, ["parallel.pp=2", "parallel.vpp=2"], "does not support parallel.vpp"),
    (1, ["model.max_position_embeddings=16"], "leaves no room for text"),
    (1, ["model.image_token_id=256"], "model.image_token_id=256 is outside the vocabulary"),
])
def test_layout_problems_name_the_field(world, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate_layout(load_config(TINY_LLAVA, overrides), world)
    assert message in str(err.value)


def test_generated_samples_fill_the_sequence_and_caption_the_image():
    from megatron_mm.training.batches import MicroBatches, build_datasets

    cfg = load_config(TINY_LLAVA)
    train, valid, test = build_datasets(cfg, None, (8, 4, 0))
    assert (len(train), len(valid), test) == (8, 4, None)
    sample = train[0]
    n_img, image_id = cfg.model.num_image_embeddings, cfg.model.image_token_id
    assert sample["tokens"].shape == sample["labels"].shape == sample["loss_mask"].shape == (cfg.data.seq_length,)
    assert sample["images"].shape == (1, 3, 32, 32)
    pixels, count = cfg.model.media_processors()["image"](numpy.full((64, 96, 3), 255, numpy.uint8))
    assert count == n_img and torch.allclose(pixels["images"], pixels["images"][:, :, :1, :1])  # white stays flat
    # one placeholder per image embedding, right after bos
    assert (sample["tokens"] == image_id).sum() == n_img and (sample["tokens"][1 : 1 + n_img] == image_id).all()
    assert sample["loss_mask"][: 1 + n_img].sum() == 0  # no loss predicting placeholders or the prompt
    assert torch.equal(train[3]["tokens"], train[3]["tokens"]) and torch.equal(train[3]["images"], train[3]["images"])
    batch = next(MicroBatches(train, 0, 2, 0, 1))
    assert sorted(batch) == ["images", "labels", "loss_mask", "position_ids", "tokens"]
    assert batch["images"].shape == (2, 3, 32, 32) and batch["tokens"].shape == (2, cfg.data.seq_length)
    # Same caption <=> same drawing attributes: different captions come with different images.
    captions = {tuple(train[i]["tokens"].tolist()): train[i]["images"] for i in range(8)}
    assert len(captions) > 1


def test_mm_data_needs_mock_and_fits_positions():
    from megatron_mm.training.batches import build_datasets

    with pytest.raises(ConfigError, match="max_position_embeddings"):
        build_datasets(load_config(TINY_LLAVA, ["data.seq_length=64"]), None, (8, 0, 0))
    with pytest.raises(ValueError, match="collides with the caption ids"):
        build_datasets(load_config(TINY_LLAVA, ["model.image_token_id=5"]), None, (8, 0, 0))


def _run_model_checks() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def model_checks() -> dict:
    return _run_model_checks()


def test_forward_backward_shapes(model_checks):
    c = model_checks
    assert c["loss_shape"] == [2, 32]  # the token positions: placeholders are expanded in the text
    assert c["grads"] == {"encoders.image.encoder": True, "encoders.image.projector": True, "language_model": True}


def test_placeholders_carry_the_image(model_checks):
    c = model_checks
    assert c["relative_change_sample0"] > 1e-4  # other pixels in sample 0: its loss moves
    assert c["relative_change_sample1"] == 0.0  # sample 1's image untouched: its loss is not
    assert c["text_before_image_unchanged"]  # causal: bos cannot see the image
    assert c["placeholder_rows_are_projected_patches"]
    assert "gave 32 embeddings for 31 placeholder tokens" in c["count_mismatch_error"]


def _model_checks_main() -> None:
    """Runs in a fresh process: one-rank world, the tiny config's model, one micro-batch."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from megatron_mm.models.layers.backend import select_backend
    from megatron_mm.runtime import init_distributed, set_seed
    from megatron_mm.training.batches import MicroBatches, build_datasets
    from megatron_mm.training.loop import model_forward

    cfg = load_config(TINY_LLAVA)
    init_distributed()
    set_seed(cfg.train.seed)
    backend = select_backend()
    tconfig = cfg.model.transformer_config(cfg.parallel, cfg.train, backend, batch_p2p_comm=False)
    model = cfg.model.build(tconfig, backend, pre_process=True, post_process=True)
    train, _, _ = build_datasets(cfg, None, (8, 0, 0))
    batch = next(MicroBatches(train, 0, 2, 0, 1))
    mask = batch["loss_mask"]

    loss = model_forward(model, batch, with_labels=True)
    (loss * mask).sum().backward()
    grads = {name: all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.get_submodule(name).parameters())
             for name in ("encoders.image.encoder", "encoders.image.projector", "language_model")}
    with torch.no_grad():
        other = dict(batch, images=batch["images"].clone())
        other["images"][0] = -other["images"][0]  # sample 0 gets other pixels
        loss2 = model_forward(model, other, with_labels=True)
        # the decoder input at placeholder positions is the encoder's output, in order
        embedded = model._embed(batch["tokens"], {"images": batch["images"]}).transpose(0, 1)
        rows = model.encoders["image"](batch["images"])
        placeholders = batch["tokens"] == cfg.model.image_token_id
        rows_match = torch.equal(embedded[placeholders], rows)
        try:
            broken = dict(batch, tokens=batch["tokens"].clone())
            broken["tokens"][0, 1] = 3
            model_forward(model, broken, with_labels=True)
            mismatch = ""
        except ValueError as err:
            mismatch = str(err)
    per_sample, per_sample2 = (loss * mask).sum(dim=1).detach(), (loss2 * mask).sum(dim=1)
    print(json.dumps({
        "loss_shape": list(loss.shape),
        "grads": grads,
        "relative_change_sample0": abs((per_sample2[0] - per_sample[0]) / per_sample[0]).item(),
        "relative_change_sample1": abs((per_sample2[1] - per_sample[1]) / per_sample[1]).item(),
        "text_before_image_unchanged": bool(torch.equal(loss[:, 0].detach(), loss2[:, 0])),
        "placeholder_rows_are_projected_patches": rows_match,
        "count_mismatch_error": mismatch,
    }))


if __name__ == "__main__":
    _model_checks_main()
