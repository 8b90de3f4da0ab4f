"""Dense families against transformers' own models: logits at one rank and at TP2xPP2, and the
import -> export round trip bit for bit."""

from __future__ import annotations

from conftest import assert_round_trip, check_parity

COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
              max_position_embeddings=256)


def _check(imported, tmp_path, hf_config):
    hf_dir, checkpoint = imported(hf_config)
    assert_round_trip(hf_dir, checkpoint, tmp_path / "exported")
    assert check_parity(hf_dir, checkpoint) < 1e-4
    assert check_parity(hf_dir, checkpoint, tp=2, pp=2) < 1e-4


def test_llama3(imported, tmp_path):
    from transformers import LlamaConfig

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    _check(imported, tmp_path, LlamaConfig(**COMMON, num_key_value_heads=2, rope_parameters=rope))


def test_qwen3_tied_embeddings(imported, tmp_path):
    from transformers import Qwen3Config

    _check(imported, tmp_path, Qwen3Config(**COMMON, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True))


def test_mistral_sliding_window(imported, tmp_path):
    from transformers import MistralConfig

    # a window shorter than the 32-token parity sequence, so the window itself is compared
    _check(imported, tmp_path, MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=8))
