"""DeepSeek-V3 against transformers' own DeepseekV3ForCausalLM: MLA with YaRN, a dense first layer,
sigmoid group-limited routing with expert bias and a shared expert; logits at one rank, TP2xEP2 and
PP2xEP2, and the bit-exact round trip including the multi-token-prediction layer (which transformers
neither loads nor runs, so the test writes one into the checkpoint the way the hub stores it)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_round_trip, check_parity, hf_tensors, tiny_hf_model

from megatron_mm.checkpoint.hf import export_hf
from megatron_mm.checkpoint.hf_rules import HFConversionError

LAYERS = 4
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.8, "mscale_all_dim": 1.0}


def deepseek_config(**overrides):
    from transformers import DeepseekV3Config

    fields = dict(vocab_size=384, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1,
                  n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                  routed_scaling_factor=2.5, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                  qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256, rope_parameters=YARN,
                  num_mtp_layers=1)
    return DeepseekV3Config(**{**fields, **overrides})


def add_mtp_layer(hf_dir, seed: int = 1) -> None:
    """The hub layout of MTP layer 0: model.layers.{LAYERS}.* with enorm, hnorm, eh_proj, a full (MoE)
    decoder layer, shared_head.norm and copies of the embedding and the output head. Also makes every
    router's expert bias large enough to change which experts are chosen."""
    from safetensors.torch import load_file, save_file

    path = hf_dir / "model.safetensors"
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.1

    mtp, hidden = f"model.layers.{LAYERS}", 64
    for name, tensor in list(tensors.items()):  # the last decoder layer is MoE, as the MTP layer is
        if name.startswith(f"model.layers.{LAYERS - 1}."):
            tensors[name.replace(f"model.layers.{LAYERS - 1}.", f"{mtp}.")] = rand(*tensor.shape)
    tensors.update({f"{mtp}.enorm.weight": 1 + rand(hidden), f"{mtp}.hnorm.weight": 1 + rand(hidden),
                    f"{mtp}.eh_proj.weight": rand(hidden, 2 * hidden),
                    f"{mtp}.shared_head.norm.weight": 1 + rand(hidden),
                    f"{mtp}.shared_head.head.weight": tensors["lm_head.weight"].clone(),
                    f"{mtp}.embed_tokens.weight": tensors["model.embed_tokens.weight"].clone()})
    for name in tensors:
        if name.endswith("e_score_correction_bias"):
            tensors[name] = torch.randn(tensors[name].shape, generator=generator) * 0.3
    save_file(tensors, path, metadata={"format": "pt"})


def test_deepseek_v3(tmp_path):
    from megatron_mm.checkpoint.hf import import_hf

    hf_dir = tiny_hf_model(deepseek_config(), tmp_path / "hf")
    add_mtp_layer(hf_dir)
    (hf_dir / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')
    checkpoint = import_hf(hf_dir, tmp_path / "checkpoint")
    assert_round_trip(hf_dir, checkpoint, tmp_path / "exported")
    assert check_parity(hf_dir, checkpoint) < 1e-4
    assert check_parity(hf_dir, checkpoint, tp=2, ep=2) < 1e-4
    assert check_parity(hf_dir, checkpoint, pp=2, ep=2) < 1e-4


def test_deepseek_v3_plain_rope_no_mtp_no_q_lora(imported, tmp_path):
    """No rope scaling (plain RoPE), queries projected directly, no MTP layer."""
    hf_dir, checkpoint = imported(deepseek_config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                                  q_lora_rank=None, num_mtp_layers=0))
    assert_round_trip(hf_dir, checkpoint, tmp_path / "exported")
    assert check_parity(hf_dir, checkpoint) < 1e-4


@pytest.mark.parametrize("overrides, named", [
    (dict(num_experts_per_tok=2), "topk_group"),  # groups ranked by top-1, not top-2
    (dict(norm_topk_prob=False), "norm_topk_prob"),
    (dict(rms_norm_eps=1e-5), "rms_norm_eps"),
    (dict(rope_interleave=False), "rope_interleave"),
    (dict(rope_parameters={**YARN, "mscale": 0.0}), "mscale"),
])
def test_deepseek_v3_unrepresentable(overrides, named):
    from megatron_mm.models.deepseek import DeepSeekConfig

    with pytest.raises(HFConversionError, match=named):
        DeepSeekConfig.from_hf_config(deepseek_config(**overrides).to_dict())


def _convert(*args: str):
    """tools/convert_checkpoint.py, library warnings silenced so that stderr holds only its own lines."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    command = [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def saved_by_transformers(tmp_path_factory):
    """What transformers saves for DeepSeek-V3: config.json declares num_nextn_predict_layers=1 and the
    weights hold no MTP layer (its model has none). An odd vocabulary, padded on import."""
    hf_dir = tiny_hf_model(deepseek_config(vocab_size=1001), tmp_path_factory.mktemp("deepseek") / "hf")
    assert json.loads((hf_dir / "config.json").read_text())["num_nextn_predict_layers"] == 1
    return hf_dir


def test_transformers_saved_deepseek_imports_without_mtp(saved_by_transformers, tmp_path):
    from megatron_mm.config import load_config

    hf_dir = saved_by_transformers
    result = _convert("import-hf", "--hf-dir", str(hf_dir), "--output", str(tmp_path / "checkpoint"))
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stdout.splitlines() if "multi-token-prediction" in line]
    assert len(notes) == 1 and "importing without MTP" in notes[0], result.stdout
    checkpoint = tmp_path / "checkpoint"
    assert not load_config(checkpoint / "config.yaml").model.mtp_num_layers
    assert check_parity(hf_dir, checkpoint) < 1e-4
    assert check_parity(hf_dir, checkpoint, tp=2) < 1e-4
    exported = export_hf(checkpoint, tmp_path / "exported")
    tensors, original = hf_tensors(exported), hf_tensors(hf_dir)
    assert sorted(tensors) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(tensors[name], tensor), name
    config, original = (json.loads((d / "config.json").read_text()) for d in (exported, hf_dir))
    assert config.pop("num_nextn_predict_layers") == 0  # the exported weights hold no MTP layer
    assert config == {key: value for key, value in original.items() if key != "num_nextn_predict_layers"}


def test_fresh_mtp_flag_starts_an_initialised_mtp_layer(saved_by_transformers, tmp_path):
    from megatron_mm.config import load_config

    hf_dir = saved_by_transformers
    checkpoint = tmp_path / "checkpoint"
    result = _convert("import-hf", "--hf-dir", str(hf_dir), "--output", str(checkpoint), "--fresh-mtp")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sum("freshly initialised" in line for line in result.stdout.splitlines()) == 1, result.stdout
    cfg = load_config(checkpoint / "config.yaml")
    assert cfg.model.mtp_num_layers == 1
    assert check_parity(hf_dir, checkpoint) < 1e-4  # the MTP head leaves the main logits alone

    exported = export_hf(checkpoint, tmp_path / "exported")
    tensors, original = hf_tensors(exported), hf_tensors(hf_dir)
    mtp = f"model.layers.{LAYERS}."
    assert {name for name in tensors if not name.startswith(mtp)} == set(original)
    for name, tensor in original.items():
        assert torch.equal(tensors[name], tensor), name
    std = cfg.model.init_method_std
    assert torch.equal(tensors[f"{mtp}enorm.weight"], torch.ones(64))
    assert torch.equal(tensors[f"{mtp}mlp.gate.e_score_correction_bias"], torch.zeros(8))
    assert tensors[f"{mtp}eh_proj.weight"].std().item() == pytest.approx(std, rel=0.1)
    assert tensors[f"{mtp}self_attn.o_proj.weight"].std().item() == pytest.approx(std / (2 * LAYERS) ** 0.5, rel=0.1)
    assert torch.equal(tensors[f"{mtp}embed_tokens.weight"], original["model.embed_tokens.weight"])
    assert json.loads((exported / "config.json").read_text())["num_nextn_predict_layers"] == 1

    again = _convert("import-hf", "--hf-dir", str(exported), "--output", str(tmp_path / "again"), "--fresh-mtp")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [f"error: --fresh-mtp: {exported} holds multi-token-prediction weights"]
