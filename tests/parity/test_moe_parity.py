"""Softmax-routed MoE families against transformers' own models: logits at one rank and at
TP2xEP2 and PP2xEP2, and the bit-exact round trip."""

from __future__ import annotations

from conftest import assert_round_trip, check_parity

COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=2)


def _check(imported, tmp_path, hf_config):
    hf_dir, checkpoint = imported(hf_config)
    assert_round_trip(hf_dir, checkpoint, tmp_path / "exported")
    assert check_parity(hf_dir, checkpoint) < 1e-4
    assert check_parity(hf_dir, checkpoint, tp=2, ep=2) < 1e-4
    assert check_parity(hf_dir, checkpoint, pp=2, ep=2) < 1e-4


def test_qwen3_moe(imported, tmp_path):
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(**COMMON, num_experts=8, moe_intermediate_size=48, norm_topk_prob=True,
                            mlp_only_layers=[0])
    _check(imported, tmp_path, config)


def test_mixtral(imported, tmp_path):
    from transformers import MixtralConfig

    _check(imported, tmp_path, MixtralConfig(**COMMON, num_local_experts=4))
