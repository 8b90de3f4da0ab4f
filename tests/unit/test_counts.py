"""Parameter counts and FLOPs per token (models/layers/counts.py) against three references: the
figures published for the example configs, the models megatron-core builds from the tiny configs,
and Megatron-LM's FLOPs formula.

Counts use the padded vocabulary (the rows megatron-core builds); every published example below
has a vocabulary that needs no padding. The built models are made in a fresh Python process (this
file as a script), one rank, so that torch.distributed and the CPU patches do not leak into other
tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mm.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "configs"


def counts_of(name: str, overrides=()):
    return load_config(CONFIGS / f"{name}.yaml", list(overrides)).model.counts()


def within_last_digit(ours: float, figure: str, unit: float) -> bool:
    """Publishers round or truncate: ours is within one unit of the figure's last printed digit."""
    step = 10.0 ** -len(figure.split(".")[1]) if "." in figure else 1.0
    return abs(ours / unit - float(figure)) <= step * (1 + 1e-9)


# (config, published total, published active, unit); totals and actives in units of 1e9 or 1e12
PUBLISHED = [
    ("llama3_8b", "8.03", None, 1e9),
    ("llama3_70b", "70.6", None, 1e9),
    ("qwen3_8b", "8.19", None, 1e9),
    ("qwen3_moe_30b_a3b", "30.5", "3.3", 1e9),
    ("mixtral_8x7b", "46.7", "12.9", 1e9),
    ("qwen2_vl_7b", "8.29", None, 1e9),  # vision tower and merger included
]


@pytest.mark.parametrize("name, total, active, unit", PUBLISHED)
def test_published_sizes(name, total, active, unit):
    counts = counts_of(name)
    assert within_last_digit(counts.total, total, unit), counts.total
    if active is not None:
        assert within_last_digit(counts.active, active, unit), counts.active
    else:
        assert counts.active == counts.total


def test_deepseek_v3_671b_main_model_37b_active():
    """DeepSeek-V3's 671B and 37B are the main model's: its report puts the MTP module's 14B apart
    (14B on the hub holds the MTP layer with its own copies of the embedding and output head; ours
    shares them with the main model, so our MTP layer alone is 11.6B)."""
    counts = counts_of("deepseek_v3")
    assert within_last_digit(counts.total - counts.mtp_total, "671", 1e9)
    assert within_last_digit(counts.active - counts.mtp_active, "37", 1e9)
    assert within_last_digit(counts.mtp_total + counts.embedding, "14", 1e9)


def test_kimi_k2_1t_32b_active():
    """Moonshot's model card: 1T total, 32B activated. (1.04T is not what this architecture holds:
    61 layers of 384 experts of 3 x 7168 x 2048 alone are 1.015T; the whole model is 1.026T.)"""
    counts = counts_of("kimi_k2")
    assert within_last_digit(counts.total, "1.0", 1e12)
    assert within_last_digit(counts.active, "32", 1e9)
    assert counts.mtp_total == 0


def test_deepseek_v3_first_layer_is_mla_and_a_dense_mlp():
    """DeepSeek-V3's first layer by its published shapes: q latent 1536 (normed), 128 heads of
    128 + 64 query dims, kv latent 512 (normed) plus one 64-dim rotary key, 128-dim values; SwiGLU
    18432; two RMSNorms. A GQA reading (128 heads x 192 for q, k, v) would count 2.3x its attention."""
    layer = counts_of("deepseek_v3").decoder[1]
    attention = (7168 * 1536 + 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 + 512 * 128 * 256
                 + 128 * 128 * 7168)
    assert layer.parameters == layer.active == attention + 3 * 7168 * 18432 + 2 * 7168


# ---- FLOPs against Megatron-LM's formula ----------------------------------------------------------
def megatron_lm_flops_per_token(m, seq_length: int) -> float:
    """Megatron-LM's num_floating_point_operations (megatron/training/training.py) for one token of
    a full causal sequence, restated from its definition: every GEMM 3 times (forward, weight and
    data gradients) at 2 FLOPs per multiply-add; per layer the attention projections (GQA: q, k, v
    and output; MLA: the q path with a +1 per q latent element for its norm, the kv latent with +1
    per element, the decoupled rotary key, kv up-projection and output) and the MLP (dense in
    first-k layers, top-k routed plus shared experts in MoE layers); core attention as
    heads x (qk + v head dims) x seq / 2 (the causal half); each MTP layer as one more layer like
    the last, its norms (3h) and its 2h x h projection; logits once per head (main + MTP)."""
    fields = {"gated_linear_unit": True, **m.family_transformer_fields()}
    h, heads, layers = m.hidden_size, m.num_attention_heads, m.num_layers
    ffn_factor = 3 if fields["gated_linear_unit"] else 2
    moe_pattern = fields.get("moe_layer_freq") or [0] * layers
    mtp_layers = fields.get("mtp_num_layers") or 0
    moe_layers = sum(moe_pattern) + moe_pattern[-1] * mtp_layers
    dense_layers = layers - sum(moe_pattern) + (1 - moe_pattern[-1]) * mtp_layers
    all_layers = layers + mtp_layers
    if fields.get("kv_lora_rank"):
        q_lora, kv_lora = fields["q_lora_rank"], fields["kv_lora_rank"]
        qk, rope, v = fields["qk_head_dim"], fields["qk_pos_emb_head_dim"], fields["v_head_dim"]
        q_term = h * heads * (qk + rope) if q_lora is None else q_lora * (h + heads * (qk + rope) + 1)
        attention = q_term + kv_lora * (h + heads * (qk + v) + 1) + h * rope + heads * v * h
        core = heads * (qk + rope) / 2 + heads * v / 2
    else:
        q, kv = heads * m.kv_channels, m.query_groups * m.kv_channels
        attention = h * (q + 2 * kv) + q * h
        core = q / 2 * 2
    mlp = h * ffn_factor * (m.ffn_hidden_size * dense_layers
                            + (fields.get("moe_ffn_hidden_size", 0) * fields.get("moe_router_topk", 0)
                               + (fields.get("moe_shared_expert_intermediate_size") or 0)) * moe_layers)
    mtp = mtp_layers * (3 * h + 2 * h * h)
    logits = h * m.padded_vocab_size() * (mtp_layers + 1)
    return 3 * 2 * (mlp + all_layers * attention + mtp + logits) + 3 * 2 * all_layers * core * seq_length


def megatron_lm_differences(m) -> float:
    """Forward multiply-adds per token we count and Megatron-LM does not, minus the reverse:
    + the router's h x experts GEMM in every MoE layer (a GEMM like any other);
    - Megatron-LM's norm terms (one per MLA latent element, 3h per MTP layer): norms are
      elementwise, and we count no elementwise work."""
    fields = m.family_transformer_fields()
    moe_pattern = fields.get("moe_layer_freq") or [0] * m.num_layers
    mtp_layers = fields.get("mtp_num_layers") or 0
    moe_layers = sum(moe_pattern) + moe_pattern[-1] * mtp_layers
    router = moe_layers * m.hidden_size * fields.get("num_moe_experts", 0)
    latent_norms = (m.num_layers + mtp_layers) * ((fields.get("q_lora_rank") or 0) + fields.get("kv_lora_rank", 0))
    return router - latent_norms - mtp_layers * 3 * m.hidden_size


@pytest.mark.parametrize("name", ["llama3_8b", "qwen3_8b", "mixtral_8x7b", "qwen3_moe_30b_a3b", "deepseek_v3",
                                  "kimi_k2"])
@pytest.mark.parametrize("seq_length", [4096, 8192])
def test_flops_match_megatron_lm_formula(name, seq_length):
    m = load_config(CONFIGS / f"{name}.yaml").model
    ours = m.counts().flops_per_token(seq_length)
    reference = megatron_lm_flops_per_token(m, seq_length) + 6 * megatron_lm_differences(m)
    assert ours == pytest.approx(reference, rel=1e-12)


def test_mla_without_q_latent_matches_megatron_lm():
    m = load_config(CONFIGS / "deepseek_v3.yaml", ["model.q_lora_rank=null", "model.mtp_num_layers=2"]).model
    ours = m.counts().flops_per_token(4096)
    assert ours == pytest.approx(megatron_lm_flops_per_token(m, 4096) + 6 * megatron_lm_differences(m), rel=1e-12)


def test_full_recompute_adds_one_forward():
    counts = counts_of("llama3_8b")
    assert counts.flops_per_token(8192, "full") == pytest.approx(4 / 3 * counts.flops_per_token(8192))
    assert counts.flops_per_token(8192, "selective") == counts.flops_per_token(8192)


def test_gemma_local_layers_attend_at_most_the_window():
    """Gemma 3 12B: 40 of 48 layers see 1024 keys at most; at 8192 tokens each local query sees
    1024 - 1024^2 / (2 * 8192) keys on average, a global one 8192 / 2."""
    m = load_config(CONFIGS / "gemma3_12b.yaml").model
    windowed = m.counts().flops_per_token(8192)
    full = counts_of("gemma3_12b", ["model.sliding_window=100000"]).flops_per_token(8192)
    width = 2 * m.num_attention_heads * m.kv_channels
    saved = 40 * width * (8192 / 2 - (1024 - 1024 ** 2 / (2 * 8192)))
    assert full - windowed == pytest.approx(6 * saved, rel=1e-12)
    short = m.counts().flops_per_token(512)  # shorter than the window: every layer is causal over all
    unwindowed = load_config(CONFIGS / "gemma3_12b.yaml", ["model.sliding_window=100000"]).model.counts()
    assert short == pytest.approx(unwindowed.flops_per_token(512), rel=1e-12)


def test_projector_type_changes_the_count():
    mlp, affine, resampler = (counts_of("tiny_llava", [f"model.projector_type={kind}"]).encoders["image"]
                              for kind in ("mlp", "affine", "resampler"))
    assert affine.parameters == mlp.parameters - (64 * 128 + 128 + 128 * 64 + 64) + (64 * 64 + 64)
    assert resampler.embeddings_per_item == 16 and mlp.embeddings_per_item == 16
    assert len({mlp.macs_per_item, affine.macs_per_item, resampler.macs_per_item}) == 3


# ---- counts against the models megatron-core builds --------------------------------------------------
TINY = {
    "llama3 (padded vocabulary 250 -> 256)": ("tiny_llama3", ["model.vocab_size=250", "parallel.tp=1",
                                                             "parallel.pp=1"]),
    "qwen3": ("tiny_qwen3", []),
    "mistral (window)": ("tiny_mistral", []),
    "gemma3 (windows, post-norms, tied)": ("tiny_gemma3", []),
    "deepseek (MLA q latent, MTP, shared experts)": ("tiny_deepseek_v3", []),
    "deepseek (MLA without q latent, 2 MTP layers)": ("tiny_deepseek_v3", ["model.q_lora_rank=null",
                                                                            "model.mtp_num_layers=2"]),
    "deepseek (no MTP, all MoE, untied)": ("tiny_deepseek_v3", ["model.mtp_num_layers=null", "model.first_k_dense=0"]),
    "llava mlp": ("tiny_llava", []),
    "llava affine siglip": ("tiny_llava", ["model.projector_type=affine", "model.vision_encoder_type=siglip"]),
    "llava resampler": ("tiny_llava", ["model.projector_type=resampler", "model.resampler_num_layers=2"]),
    "qwen2_vl": ("tiny_qwen2_vl", []),
    "qwen2_5_vl": ("tiny_qwen2_vl", ["model.family=qwen2_5_vl", "model.vision_fullatt_block_indexes=[1]"]),
    "qwen2_vl_moe": ("tiny_qwen2_vl_moe", []),
    "audio affine": ("tiny_audio_lm", []),
    "audio mlp (llama decoder)": ("tiny_audio_lm", ["model.audio_projector_type=mlp", "model.qkv_bias=false"]),
}

TEXT_ONLY = ("tiny_llama3", "tiny_qwen3", "tiny_mistral", "tiny_gemma3", "tiny_deepseek_v3")


@pytest.fixture(scope="module")
def built() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")  # no compile: the models are only built
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(TINY))
def test_count_is_the_built_models_numel(built, case):
    name, overrides = TINY[case]
    counts = counts_of(name, overrides)
    assert counts.total == built[case]["total"]
    assert counts.encoder_total == built[case]["encoders"]
    assert counts.mtp_total == built[case]["mtp"]


MEASURED_SEQ = 16


@pytest.mark.parametrize("case", [case for case, (name, _) in TINY.items() if name in TEXT_ONLY])
def test_decoder_macs_are_the_built_models_matmuls(built, case):
    """torch's FLOP counter over one forward of MEASURED_SEQ tokens (labels given, so the MTP
    layers run too). megatron-core's local attention computes every score before masking, so the
    measured core attention is over all MEASURED_SEQ keys, where our count takes the causal half."""
    name, overrides = TINY[case]
    counts = counts_of(name, overrides)
    parts = counts.decoder + counts.mtp
    full_attention = sum(p.macs + p.attention_width * MEASURED_SEQ for p in parts)
    assert built[case]["forward_flops_per_token"] == 2 * full_attention


@pytest.mark.parametrize("case", [case for case, (name, _) in TINY.items() if name not in TEXT_ONLY])
def test_encoder_macs_are_the_built_encoders_matmuls(built, case):
    """torch's FLOP counter over the encoder's forward on one item of the size the counts assume."""
    name, overrides = TINY[case]
    (encoder,) = counts_of(name, overrides).encoders.values()
    assert built[case]["encoder_flops_per_item"] == 2 * encoder.macs_per_item


def _one_item(model_cfg) -> dict:
    """One media item of the size the counts assume: an image of vision_image_size, a Qwen2-VL image
    at the pixel budget (a square grid of patches), a clip of the chunk length."""
    import torch

    if hasattr(model_cfg, "audio"):
        audio = model_cfg.audio()
        return {"audio_features": torch.randn(1, audio.num_mel_bins, audio.num_frames)}
    if hasattr(model_cfg, "vision_max_pixels"):
        vision = model_cfg.vision()
        side = int((model_cfg.vision_max_pixels // vision.patch_size ** 2) ** 0.5)
        return {"pixel_values": torch.randn(side * side, vision.patch_dim),
                "image_grid_thw": torch.tensor([[1, side, side]])}
    return {"images": torch.randn(1, 3, model_cfg.vision_image_size, model_cfg.vision_image_size)}


def _build_main() -> None:
    """Runs in a fresh process: a one-rank world, each tiny model built whole, numel summed, the
    matmul FLOPs of a forward counted."""
    sys.path.insert(0, str(ROOT))
    import torch
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_mm.models.layers.backend import select_backend
    from megatron_mm.runtime import init_distributed, set_seed

    init_distributed()
    set_seed(1)
    backend = select_backend("local")
    sizes = {}
    for case, (name, overrides) in TINY.items():
        cfg = load_config(CONFIGS / f"{name}.yaml", overrides)
        tconfig = cfg.model.transformer_config(cfg.parallel, cfg.train, backend, batch_p2p_comm=False)
        model = cfg.model.build(tconfig, backend, pre_process=True, post_process=True)
        named = dict(model.named_parameters())
        sizes[case] = {"total": sum(p.numel() for p in named.values()),
                       "encoders": sum(p.numel() for n, p in named.items() if n.startswith("encoders.")),
                       "mtp": sum(p.numel() for n, p in named.items() if n.split(".")[0] == "mtp")}
        # loss trackers are sized by the first model's layer counts
        MTPLossLoggingHelper.tracker.clear()
        get_moe_layer_wise_logging_tracker().clear()
        counter = FlopCounterMode(display=False)
        with counter:  # forward only; MTP and the MoE aux loss need autograd on
            if name in TEXT_ONLY:
                tokens = torch.randint(0, cfg.model.vocab_size, (1, MEASURED_SEQ))
                model(tokens, torch.arange(MEASURED_SEQ).unsqueeze(0), None, labels=tokens)
            else:
                (encoder,) = model.encoders.values()
                encoder(**_one_item(cfg.model))
        key = "forward_flops_per_token" if name in TEXT_ONLY else "encoder_flops_per_item"
        sizes[case][key] = counter.get_total_flops() / (MEASURED_SEQ if name in TEXT_ONLY else 1)
    print(json.dumps(sizes))


if __name__ == "__main__":
    _build_main()
