"""Fixed-resolution vision encoders and projectors (models/vision.py) and their image processor
(data/image_processing.py).

- CLIP and SigLIP encoders against transformers' CLIPVisionModel / SiglipVisionModel: tiny random
  towers, every tensor perturbed, weights mapped by vision_tower_hf_rules; all layers, and only the
  layers up to the hidden state LLaVA reads (vision_feature_layer -2).
- The resampler projector against a pure-torch implementation of the same computation on the same
  weights, and its fixed output count whatever the number of patches.

Building megatron-core modules needs torch.distributed and the CPU patches of runtime/cpu_compat.py:
those checks run in a fresh Python process (this file as a script) so that neither leaks into other
tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch

from megatron_mm.data.image_processing import FixedSizeImageProcessor
from megatron_mm.models.encoders.clip_siglip import VisionEncoderConfig
from megatron_mm.models.layers.backend import LocalBackend

LANGUAGE_HIDDEN = 48
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16,
             patch_size=4)


def _hf_tower(encoder_type: str, seed: int):
    """A transformers vision tower and its config dict, every tensor perturbed."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    config_class, model_class = {"clip": (CLIPVisionConfig, CLIPVisionModel),
                                 "siglip": (SiglipVisionConfig, SiglipVisionModel)}[encoder_type]
    torch.manual_seed(seed)
    config = config_class(**TOWER)
    tower = model_class(config).float().eval()
    with torch.no_grad():
        for tensor in tower.state_dict().values():
            tensor.add_(torch.randn_like(tensor) * 0.1)
    return tower, config.to_dict()


def _reference_resampler(state: dict, features: torch.Tensor, vision: VisionEncoderConfig, eps: float) -> torch.Tensor:
    """The resampler in plain torch: queries attend to the normalised image tokens, layer by layer
    (norm -> cross-attention -> residual, norm -> GELU MLP -> residual), a final norm, a linear."""
    import torch.nn.functional as F

    heads = vision.resampler_num_attention_heads
    head_dim = vision.hidden_size // heads
    ln = lambda x, name: F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)  # noqa: E731
    linear = lambda x, name: F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])  # noqa: E731
    n, tokens, _ = features.shape
    context = ln(features, "context_norm")
    x = state["queries"].unsqueeze(0).expand(n, -1, -1)
    for i in range(vision.resampler_num_layers):
        p = f"block.layers.{i}"
        q = linear(ln(x, f"{p}.pre_cross_attn_layernorm"), f"{p}.cross_attention.linear_q")
        q = q.view(n, -1, heads, head_dim).transpose(1, 2)
        kv = linear(context, f"{p}.cross_attention.linear_kv").view(n, tokens, heads, 2, head_dim)
        k, v = kv[..., 0, :].transpose(1, 2), kv[..., 1, :].transpose(1, 2)  # per head: [key; value]
        weights = torch.softmax(q @ k.transpose(-1, -2) / head_dim ** 0.5, dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(n, -1, vision.hidden_size)
        x = x + linear(attended, f"{p}.cross_attention.linear_proj")
        h = ln(x, f"{p}.pre_mlp_layernorm")
        x = x + linear(F.gelu(linear(h, f"{p}.mlp.linear_fc1")), f"{p}.mlp.linear_fc2")
    return linear(ln(x, "block.final_layernorm"), "output").reshape(n * x.shape[1], -1)


def _encoder_checks_main() -> None:
    """Runs in a fresh process: a world of one, fp32."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mm.models.encoders.clip_siglip import (
        ImageTower,
        ResamplerProjector,
        vision_config_from_hf,
        vision_encoder_class,
        vision_tower_hf_rules,
    )
    from megatron_mm.runtime import init_distributed, set_seed

    init_distributed()
    set_seed(0)
    language = TransformerConfig(num_layers=1, hidden_size=LANGUAGE_HIDDEN, num_attention_heads=4,
                                 params_dtype=torch.float32, gradient_accumulation_fusion=False,
                                 persist_layer_norm=False, bias_dropout_fusion=False)
    results = {}
    torch.manual_seed(5)
    images = torch.randn(3, 3, TOWER["image_size"], TOWER["image_size"])
    for seed, encoder_type in enumerate(("clip", "siglip")):
        tower, hf_config = _hf_tower(encoder_type, seed)
        hf_state = tower.state_dict()
        with torch.no_grad():
            theirs = tower(pixel_values=images, output_hidden_states=True)
        # all layers: CLIP's last hidden state has no final norm, SigLIP's has one
        for case, feature_layer in (("all", -1), ("llava", -2)):
            problems = []
            layers = VisionEncoderConfig.layers_up_to(feature_layer, hf_config["num_hidden_layers"])
            vision = vision_config_from_hf(hf_config, layers, problems)
            assert not problems, problems
            encoder = vision_encoder_class()(
                vision.encoder_transformer_config(language), LocalBackend().vit_layer_spec(),
                patch_dim=vision.patch_size, img_h=vision.image_size, img_w=vision.image_size).eval()
            rules = vision_tower_hf_rules(vision, ours="", hf="")
            missing, unexpected = encoder.load_state_dict(
                {rule.ours: rule.to_ours([hf_state[name] for name in rule.hf]) for rule in rules}, strict=False)
            with torch.no_grad():
                ours = encoder(images)
            expected = theirs.last_hidden_state if case == "all" else theirs.hidden_states[feature_layer]
            back = {name: t for rule in rules for name, t in zip(rule.hf, rule.to_hf(encoder.state_dict()[rule.ours]))}
            results[f"{encoder_type}_{case}"] = {
                "layers": layers,
                "shape": list(ours.shape),
                "expected_shape": list(expected.shape),
                "unmapped": sorted(name for name in missing if not name.endswith("_extra_state")),
                "unexpected": list(unexpected),
                "hf_unread": sorted({name.split(".")[0] if not name.startswith("encoder.layers.")
                                     else ".".join(name.split(".")[:3]) for name in set(hf_state) - set(back)}),
                "round_trip": all(torch.equal(back[name], hf_state[name]) for name in back),
                "vs_hf_rel": ((ours - expected).abs().max() / expected.abs().max()).item(),
            }

    # The resampler: same weights, a pure-torch computation; any number of patches in, num_queries out.
    vision = VisionEncoderConfig(hidden_size=32, num_attention_heads=4, projector_type="resampler",
                                 resampler_num_queries=5, resampler_num_layers=2, resampler_num_attention_heads=4,
                                 resampler_ffn_hidden_size=40)
    resampler = ResamplerProjector(vision, language, LocalBackend()).eval()
    with torch.no_grad():
        for tensor in resampler.parameters():
            tensor.add_(torch.randn_like(tensor) * 0.1)
    state = dict(resampler.named_parameters())
    torch.manual_seed(6)
    features = {tokens: torch.randn(3, tokens, 32) for tokens in (16, 37)}
    resampler_results = {}
    with torch.no_grad():
        for tokens, x in features.items():
            ours = resampler(x)
            reference = _reference_resampler(state, x, vision, language.layernorm_epsilon)
            one_by_one = torch.cat([resampler(x[i:i + 1]) for i in range(len(x))])
            shuffled = resampler(x[:, torch.randperm(tokens)])
            resampler_results[tokens] = {
                "shape": list(ours.shape),
                "vs_reference_rel": ((ours - reference).abs().max() / reference.abs().max()).item(),
                "batched_vs_single_abs": (ours - one_by_one).abs().max().item(),
                "token_order_abs": (ours - shuffled).abs().max().item(),
                "images_differ": (ours[:5] - ours[5:10]).abs().max().item(),
            }
    out = resampler(features[16])
    out.square().sum().backward()
    resampler_results["query_grad"] = resampler.queries.grad.abs().max().item()
    results["resampler"] = resampler_results

    # Whole towers: the count of embeddings per image is what the config promises.
    towers = {}
    for encoder_type, projector_type, image_size in (("clip", "mlp", 16), ("siglip", "mlp", 16),
                                                      ("clip", "resampler", 16), ("clip", "resampler", 32)):
        vision = VisionEncoderConfig(image_size=image_size, patch_size=4, hidden_size=32, num_layers=1,
                                     num_attention_heads=4, ffn_hidden_size=64, encoder_type=encoder_type,
                                     projector_type=projector_type, projector_ffn_hidden_size=48,
                                     resampler_num_queries=6, resampler_ffn_hidden_size=40)
        with torch.no_grad():
            rows = ImageTower(vision, language, LocalBackend()).eval()(torch.randn(2, 3, image_size, image_size))
        towers[f"{encoder_type}_{projector_type}_{image_size}"] = [list(rows.shape), 2 * vision.num_image_embeddings]
    results["towers"] = towers
    print(json.dumps(results))


@pytest.fixture(scope="module")
def encoder_checks() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("encoder_type", ["clip", "siglip"])
@pytest.mark.parametrize("case", ["all", "llava"])
def test_encoder_matches_transformers(encoder_checks, encoder_type, case):
    c = encoder_checks[f"{encoder_type}_{case}"]
    print(f"{encoder_type}, {c['layers']} layers: max |ours - transformers| = {c['vs_hf_rel']:.2e} of the largest")
    assert c["shape"] == c["expected_shape"]
    assert c["shape"][1] == 16 + (encoder_type == "clip")  # 4x4 patches (+ CLIP's class token)
    assert c["unmapped"] == [] and c["unexpected"] == [] and c["round_trip"]
    # what the mapping leaves unread: SigLIP's pooling head, and past the layers run, the final norm
    unread = {"clip": ["post_layernorm"], "siglip": ["head"]}[encoder_type]
    if case == "llava":
        unread = sorted(unread + ["encoder.layers.2"] + (["post_layernorm"] if encoder_type == "siglip" else []))
    assert c["hf_unread"] == unread
    assert c["vs_hf_rel"] < 1e-5


def test_llava_feature_layer_counts_hidden_states_as_transformers_does():
    assert [VisionEncoderConfig.layers_up_to(i, 24) for i in (-1, -2, 1, 24)] == [24, 23, 1, 24]
    with pytest.raises(ValueError):
        VisionEncoderConfig.layers_up_to(-25, 24)  # the embeddings: no layer runs


@pytest.mark.parametrize("tokens", ["16", "37"])
def test_resampler_matches_pure_torch_reference(encoder_checks, tokens):
    c = encoder_checks["resampler"][tokens]
    print(f"{tokens} tokens per image: relative difference to the reference {c['vs_reference_rel']:.2e}")
    assert c["shape"] == [3 * 5, LANGUAGE_HIDDEN]  # 5 queries per image whatever the token count
    assert c["vs_reference_rel"] < 1e-5
    assert c["batched_vs_single_abs"] < 1e-5  # images do not see each other
    assert c["token_order_abs"] < 1e-5  # attention to a set: no positions inside the resampler
    assert c["images_differ"] > 1e-3


def test_resampler_queries_are_trained(encoder_checks):
    assert encoder_checks["resampler"]["query_grad"] > 0


def test_towers_give_the_promised_embeddings_per_image(encoder_checks):
    towers = encoder_checks["towers"]
    for name, (shape, expected_rows) in towers.items():
        assert shape == [expected_rows, LANGUAGE_HIDDEN], name
    assert towers["clip_mlp_16"][1] == towers["siglip_mlp_16"][1] == 2 * 16  # class token dropped
    assert towers["clip_resampler_16"][0] == towers["clip_resampler_32"][0] == [2 * 6, LANGUAGE_HIDDEN]


def test_config_problems_are_named():
    from megatron_mm.config import ParallelConfig

    assert VisionEncoderConfig().validate(ParallelConfig()) == []
    bad = VisionEncoderConfig(encoder_type="dino", projector_type="resampler", resampler_num_attention_heads=3)
    problems = " | ".join(bad.validate(ParallelConfig(tp=2)))
    for expected in ("encoder_type='dino'", "resampler_num_attention_heads=3", "parallel.tp=2"):
        assert expected in problems


def _random_image(height: int, width: int, seed: int, channels: int = 3) -> numpy.ndarray:
    shape = (height, width, channels) if channels else (height, width)
    return numpy.random.default_rng(seed).integers(0, 256, shape, dtype=numpy.uint8)


@pytest.mark.parametrize("encoder_type", ["clip", "siglip"])
def test_processor_matches_transformers(encoder_type):
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    size = 24
    theirs_processor = (CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
                        if encoder_type == "clip" else SiglipImageProcessorPil(size={"height": size, "width": size}))
    ours = FixedSizeImageProcessor(size, encoder_type, num_placeholders=7)
    # taller, wider, square, larger and smaller than the target, and one grayscale
    images = [_random_image(20, 31, 0), _random_image(57, 30, 1), _random_image(24, 24, 2),
              _random_image(90, 70, 3), _random_image(33, 41, 4, channels=0)]
    for image in images:
        theirs = theirs_processor(Image.fromarray(image), return_tensors="pt")["pixel_values"]
        media, count = ours(image)
        difference = (media["images"] - theirs).abs().max().item()
        print(f"{encoder_type} {image.shape}: max |ours - transformers| {difference:.2e}")
        assert media["images"].shape == theirs.shape == (1, 3, size, size)
        assert difference < 1e-5 and count == 7


if __name__ == "__main__":
    _encoder_checks_main()
