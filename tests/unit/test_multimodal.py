"""The LLaVA-style family (models/multimodal.py, models/vision.py) on one process.

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

import pytest
import torch

from megatron_mm.config import ConfigError, load_config
from megatron_mm.runtime.layout import validate_layout

TINY_LLAVA = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_llava.yaml"


def test_config_is_a_llama_language_model_plus_a_vision_encoder():
    from megatron_mm.models.llama import LlamaConfig
    from megatron_mm.models.multimodal import LlavaConfig

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
    (1, ["model.vision_patch_size=5"], "vision image_size=32 is not divisible by patch_size=5"),
    (2, ["parallel.pp=2", "parallel.vpp=2"], "does not support parallel.vpp"),
    (2, ["parallel.tp=2", "parallel.sequence_parallel=true"], "need Transformer Engine"),
    (1, ["model.max_position_embeddings=16"], "leaves no room for text"),
])
def test_layout_problems_name_the_field(world, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate_layout(load_config(TINY_LLAVA, overrides), world, have_te=False)
    assert message in str(err.value)


def test_generated_samples_fill_the_sequence_and_caption_the_image():
    from megatron_mm.training.data import MicroBatches, build_datasets

    cfg = load_config(TINY_LLAVA)
    train, valid, test = build_datasets(cfg, None, (8, 4, 0))
    assert (len(train), len(valid), test) == (8, 4, None)
    sample = train[0]
    text_length = cfg.data.seq_length - cfg.model.num_image_embeddings + 1
    assert sample["tokens"].shape == sample["labels"].shape == sample["loss_mask"].shape == (text_length,)
    assert sample["images"].shape == (3, 32, 32) and -1 <= sample["images"].min() < sample["images"].max() <= 1
    assert (sample["tokens"] == cfg.model.image_token_id).sum() == 1 and sample["tokens"][1] == cfg.model.image_token_id
    assert sample["loss_mask"][:2].sum() == 0  # no loss predicting the image or the prompt
    assert torch.equal(train[3]["tokens"], train[3]["tokens"]) and torch.equal(train[3]["images"], train[3]["images"])
    batch = next(MicroBatches(train, 0, 2, 0, 1))
    assert sorted(batch) == ["images", "labels", "loss_mask", "position_ids", "tokens"]
    assert batch["images"].shape == (2, 3, 32, 32)
    # Same caption <=> same drawing attributes: different captions come with different images.
    captions = {tuple(train[i]["tokens"].tolist()): train[i]["images"] for i in range(8)}
    assert len(captions) > 1


def test_mm_data_needs_mock_and_a_matching_sequence():
    from megatron_mm.training.data import build_datasets

    with pytest.raises(ConfigError, match="data.mock=true"):
        build_datasets(load_config(TINY_LLAVA, ["data.mock=false"]), None, (8, 0, 0))
    with pytest.raises(ConfigError, match="equal with parallel.pp > 1"):
        build_datasets(load_config(TINY_LLAVA, ["parallel.pp=2", "model.max_position_embeddings=64"]), None, (8, 0, 0))


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
    assert c["loss_shape"] == [2, 32]  # text - 1 placeholder + 16 image embeddings
    assert c["loss_mask_shape"] == [2, 32]
    assert c["image_positions_masked"] and c["mask_sum_kept"]
    assert c["grads"] == {"vision_model": True, "vision_projection": True, "language_model": True}


def test_loss_depends_on_the_image(model_checks):
    c = model_checks
    assert c["relative_change_sample0"] > 1e-4  # other pixels in sample 0: its loss moves
    assert c["relative_change_sample1"] == 0.0  # sample 1's image untouched: its loss is not
    assert c["text_before_image_unchanged"]  # causal: the token before the image cannot see it


def _model_checks_main() -> None:
    """Runs in a fresh process: one-rank world, the tiny config's model, one micro-batch."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from megatron_mm.runtime import init_distributed, set_seed, transformer_engine_available
    from megatron_mm.training.data import MicroBatches, build_datasets

    cfg = load_config(TINY_LLAVA)
    init_distributed()
    set_seed(cfg.train.seed)
    use_te = transformer_engine_available()
    tconfig = cfg.model.transformer_config(cfg.parallel, cfg.train, use_te=use_te, batch_p2p_comm=False)
    model = cfg.model.build(tconfig, use_te, pre_process=True, post_process=True)
    train, _, _ = build_datasets(cfg, None, (8, 0, 0))
    batch = next(MicroBatches(train, 0, 2, 0, 1))

    def run(images):
        return model(images, batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                     loss_mask=batch["loss_mask"])

    loss, loss_mask = run(batch["images"])
    (loss * loss_mask).sum().backward()
    grads = {name: all(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, name).parameters())
             for name in ("vision_model", "vision_projection", "language_model")}
    n_img = cfg.model.num_image_embeddings
    with torch.no_grad():
        other = batch["images"].clone()
        other[0] = -other[0]  # sample 0 gets other pixels
        loss2, _ = run(other)
    per_sample = (loss * loss_mask).sum(dim=1).detach()
    per_sample2 = (loss2 * loss_mask).sum(dim=1)
    print(json.dumps({
        "loss_shape": list(loss.shape),
        "loss_mask_shape": list(loss_mask.shape),
        "image_positions_masked": bool(loss_mask[:, 1 : 1 + n_img].sum() == 0),
        "mask_sum_kept": bool(loss_mask.sum() == batch["loss_mask"].sum()),
        "grads": grads,
        "relative_change_sample0": abs((per_sample2[0] - per_sample[0]) / per_sample[0]).item(),
        "relative_change_sample1": abs((per_sample2[1] - per_sample[1]) / per_sample[1]).item(),
        "text_before_image_unchanged": bool(torch.equal(loss[:, 0].detach(), loss2[:, 0])),
    }))


if __name__ == "__main__":
    _model_checks_main()
