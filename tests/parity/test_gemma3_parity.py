"""Gemma 3 text (Gemma3ForCausalLM) against transformers' own model: fp32 logits at one rank and at
TP2xPP2, and the import -> export round trip bit for bit with an equal config.

The tiny model has both layer types (2 local : 1 global, a window shorter than the 32-token parity
sequence), distinct local/global rotary bases with linear scaling on the global one,
query_pre_attn_scalar != head_dim, and head_dim != hidden / heads."""

from __future__ import annotations

import pytest
from conftest import assert_round_trip, check_parity

COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=256, sliding_window=8,
              query_pre_attn_scalar=24)
ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 100000.0}}


def _config(**overrides):
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(**{**COMMON, "rope_parameters": ROPE, **overrides})
    config.architectures = ["Gemma3ForCausalLM"]
    return config


def test_gemma3_text(imported, tmp_path):
    hf_dir, checkpoint = imported(_config(sliding_window_pattern=3))
    assert_round_trip(hf_dir, checkpoint, tmp_path / "exported")
    assert check_parity(hf_dir, checkpoint) < 1e-4
    assert check_parity(hf_dir, checkpoint, tp=2, pp=2) < 1e-4


def test_gemma3_explicit_layer_types(imported, tmp_path):
    """An irregular layer_types list (not a pattern), untied embeddings, plain global rope."""
    types = ["full_attention", "sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
             "full_attention"]
    rope = {**ROPE, "full_attention": {"rope_type": "default", "rope_theta": 100000.0}}
    hf_dir, checkpoint = imported(_config(layer_types=types, rope_parameters=rope, tie_word_embeddings=False))
    assert_round_trip(hf_dir, checkpoint, tmp_path / "exported")
    assert check_parity(hf_dir, checkpoint) < 1e-4


@pytest.mark.parametrize("field, value", [("final_logit_softcapping", 30.0), ("attn_logit_softcapping", 50.0)])
def test_gemma3_softcapping_is_refused(field, value):
    from megatron_mm.checkpoint.hf_rules import HFConversionError
    from megatron_mm.models.gemma3 import Gemma3Config

    hf = {**_config().to_dict(), field: value}
    with pytest.raises(HFConversionError, match=field):
        Gemma3Config.from_hf_config(hf)
