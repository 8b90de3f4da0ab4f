"""The Qwen2-VL / Qwen2.5-VL vision side against transformers' own implementation: the encoder
(models/qwen2_vl_vision.py) on tiny random towers with every tensor perturbed, the image processor
and the M-RoPE positions (data/qwen2_vl_processing.py).

The encoder checks build megatron-core modules, which needs torch.distributed and the CPU patches of
runtime/cpu_compat.py: they run in a fresh Python process (this file as a script) so that neither
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

from megatron_mm.data.qwen2_vl_processing import Qwen2VLImageProcessor, mrope_position_ids
from megatron_mm.models.layers.backend import LocalBackend

# Images of 4x6, 8x4 and 2x2 patches and a video of two temporal patches (4 frames) of 4x4.
GRIDS = [[1, 4, 6], [1, 8, 4], [1, 2, 2], [2, 4, 4]]
LANGUAGE_HIDDEN = 48


def _hf_towers() -> dict:
    """variant -> (transformers vision tower, its config dict), tiny, every tensor perturbed."""
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    configs = {
        "qwen2_vl": (Qwen2VisionTransformerPretrainedModel, Qwen2VLVisionConfig(
            depth=2, embed_dim=32, hidden_size=LANGUAGE_HIDDEN, num_heads=4, mlp_ratio=2, patch_size=4)),
        # windows of 16 pixels = 2x2 merged groups: every image above spans several windows
        "qwen2_5_vl": (Qwen2_5_VisionTransformerPretrainedModel, Qwen2_5_VLVisionConfig(
            depth=3, hidden_size=32, intermediate_size=40, out_hidden_size=LANGUAGE_HIDDEN, num_heads=4,
            patch_size=4, window_size=16, fullatt_block_indexes=[1])),
    }
    towers = {}
    for seed, (variant, (model_class, config)) in enumerate(configs.items()):
        torch.manual_seed(seed)
        tower = model_class._from_config(config).float().eval()
        with torch.no_grad():
            for tensor in tower.state_dict().values():
                tensor.add_(torch.randn_like(tensor) * 0.1)
        towers[variant] = (tower, config.to_dict())
    return towers


def _encoder_checks_main() -> None:
    """Runs in a fresh process: a world of one, both variants, fp32."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mm.models.encoders.qwen2_vl_vision import Qwen2VLImageEncoder, vision_config_from_hf, visual_hf_rules
    from megatron_mm.runtime import init_distributed, set_seed

    init_distributed()
    set_seed(0)
    language = TransformerConfig(num_layers=1, hidden_size=LANGUAGE_HIDDEN, num_attention_heads=4,
                                 params_dtype=torch.float32, gradient_accumulation_fusion=False,
                                 persist_layer_norm=False, bias_dropout_fusion=False)
    grids = torch.tensor(GRIDS)
    results = {}
    for variant, (tower, hf_config) in _hf_towers().items():
        problems = []
        vision = vision_config_from_hf(hf_config, variant, LANGUAGE_HIDDEN, problems)
        assert not problems, problems
        encoder = Qwen2VLImageEncoder(vision, language, LocalBackend()).eval()
        hf_state = tower.state_dict()  # the tower's own names: no "visual." prefix
        rules = visual_hf_rules(vision, ours="", hf="")
        ours = {rule.ours: rule.to_ours([hf_state[name] for name in rule.hf]) for rule in rules}
        missing, unexpected = encoder.load_state_dict(ours, strict=False)
        torch.manual_seed(1)
        pixels = torch.randn(int(grids.prod(-1).sum()), vision.patch_dim)
        with torch.no_grad():
            theirs = tower(pixels, grid_thw=grids).pooler_output
            together = encoder(pixels, grids)
            one_by_one, start = [], 0
            for grid in grids:
                count = int(grid.prod())
                one_by_one.append(encoder(pixels[start:start + count], grid[None]))
                start += count
            one_by_one = torch.cat(one_by_one)
            back = {name: t for rule in rules for name, t in zip(rule.hf, rule.to_hf(encoder.state_dict()[rule.ours]))}
            round_trip = all(torch.equal(back[name], hf_state[name]) for name in hf_state)
            # Every layer attending to whole frames must change 2.5's output: the windows matter.
            if variant == "qwen2_5_vl":
                vision.fullatt_block_indexes = tuple(range(vision.depth))
                results["window_effect"] = (encoder(pixels, grids) - together).abs().max().item()
        results[variant] = {
            "shape": list(together.shape),
            "expected_rows": sum(t * h * w // 4 for t, h, w in GRIDS),
            "unmapped": sorted(name for name in missing if not name.endswith("_extra_state")),
            "unexpected": list(unexpected),
            "hf_tensors_mapped": sorted(name for rule in rules for name in rule.hf) == sorted(hf_state),
            "round_trip": round_trip,
            "vs_hf_abs": (together - theirs).abs().max().item(),
            "vs_hf_rel": ((together - theirs).abs().max() / theirs.abs().max()).item(),
            "batched_vs_single_abs": (together - one_by_one).abs().max().item(),
        }
    print(json.dumps(results))


@pytest.fixture(scope="module")
def encoder_checks() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
def test_encoder_matches_transformers_vision_tower(encoder_checks, variant):
    c = encoder_checks[variant]
    print(f"{variant}: max |ours - transformers| = {c['vs_hf_abs']:.2e} ({c['vs_hf_rel']:.2e} of the largest output)")
    assert c["shape"] == [c["expected_rows"], LANGUAGE_HIDDEN]
    assert c["unmapped"] == [] and c["unexpected"] == [] and c["hf_tensors_mapped"]
    assert c["round_trip"]  # our tensors map back to transformers' bit for bit
    assert c["vs_hf_rel"] < 1e-5


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
def test_images_of_different_sizes_in_one_call_match_one_call_each(encoder_checks, variant):
    c = encoder_checks[variant]
    print(f"{variant}: max |one call - one call per image| = {c['batched_vs_single_abs']:.2e}")
    assert c["batched_vs_single_abs"] < 1e-5


def test_windows_change_qwen2_5_output(encoder_checks):
    print(f"all-full-attention vs windowed: max difference {encoder_checks['window_effect']:.2e}")
    assert encoder_checks["window_effect"] > 1e-3


def _random_image(height: int, width: int, seed: int) -> numpy.ndarray:
    return numpy.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=numpy.uint8)


def test_processor_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    budget = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 20)
    theirs_processor, ours = Qwen2VLImageProcessorPil(**budget), Qwen2VLImageProcessor(**budget)
    # grown to the minimum area, rounded to multiples of 28, shrunk to the maximum area
    images = [_random_image(20, 31, 0), _random_image(70, 130, 1), _random_image(301, 211, 2)]
    theirs = theirs_processor(images, return_tensors="pt")
    media = [ours(image) for image in images]
    pixels = torch.cat([m["pixel_values"] for m, _ in media])
    grids = torch.cat([m["image_grid_thw"] for m, _ in media])
    difference = (pixels - theirs["pixel_values"]).abs().max().item()
    print(f"grids {grids.tolist()}; max |ours - transformers| pixel value {difference:.2e}")
    assert torch.equal(grids, theirs["image_grid_thw"])
    assert len({tuple(g) for g in grids.tolist()}) == 3
    assert difference < 1e-5
    assert [n for _, n in media] == [t * h * w // 4 for t, h, w in grids.tolist()]


def test_video_frames_fill_temporal_patches():
    processor = Qwen2VLImageProcessor()
    frames = [_random_image(56, 84, seed) for seed in range(3)]
    media, count = processor(frames)
    (t, h, w), = media["image_grid_thw"].tolist()
    assert (t, h, w) == (2, 4, 6) and count == 2 * 4 * 6 // 4
    # rows: (channel, frame in temporal patch, y, x); the last temporal patch repeats frame 3
    rows = media["pixel_values"].reshape(t, h * w, 3, 2, 14 * 14)
    assert not torch.equal(rows[0, :, :, 0], rows[0, :, :, 1])
    assert torch.equal(rows[1, :, :, 0], rows[1, :, :, 1])
    image, _ = processor(frames[0])
    assert torch.equal(image["pixel_values"], rows[0, :, :, 0:1].expand(-1, -1, 2, -1).reshape(h * w, -1))


@pytest.mark.parametrize("variant", ["qwen2_vl", "qwen2_5_vl"])
def test_mrope_positions_match_transformers(variant):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel, Qwen2VLConfig, Qwen2VLModel

    config_class, model_class = {"qwen2_vl": (Qwen2VLConfig, Qwen2VLModel),
                                 "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLModel)}[variant]
    image_id = 7
    config = config_class(
        image_token_id=image_id, video_token_id=8, vision_start_token_id=9,
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=16, out_hidden_size=16, num_heads=2))
    model = model_class(config)
    grids = torch.tensor([[1, 4, 6], [1, 8, 4]])
    tokens = torch.tensor([1, 2, 3] + [image_id] * 6 + [4, 5, 6, 9] + [image_id] * 8 + [10, 11])
    ours = mrope_position_ids(tokens, grids, image_id, merge_size=2)
    theirs, _ = model.get_rope_index(tokens[None], mm_token_type_ids=(tokens == image_id).int()[None],
                                     image_grid_thw=grids)
    print(f"{variant}: last positions {ours[:, -1].tolist()}, equal to transformers: {torch.equal(ours, theirs[:, 0])}")
    assert torch.equal(ours, theirs[:, 0])


def test_mrope_placeholder_count_must_fit_the_grid():
    with pytest.raises(ValueError, match="needs 6 placeholder tokens"):
        mrope_position_ids(torch.tensor([1, 7, 7, 7, 2]), [[1, 4, 6]], 7)
    with pytest.raises(ValueError, match="more grids"):
        mrope_position_ids(torch.tensor([1, 2]), [[1, 2, 2]], 7)


if __name__ == "__main__":
    _encoder_checks_main()
