"""Qwen2-Audio (Qwen2AudioForConditionalGeneration) against transformers' own model: tiny random
models, every tensor perturbed (a Qwen2 decoder, and a Llama decoder), imported
with the conversion tool's machinery; both run in fp32 on the same two samples (three clips made by
our log-mel processor, full 1 s chunks, expanded placeholders). The export gives back every tensor
bit for bit (Whisper's key projection has no bias, ours a zero one), and a model transformers loads
from it gives the same logits."""

from __future__ import annotations

import json

import numpy
import pytest
import torch
from conftest import TOLERANCE, hf_tensors

AUDIO = 120
SEQ = 72
EMBEDDINGS = 25  # 1 s: 100 mel frames -> 50 positions -> 25 after pooling


def _hf_config(language: str, tie: bool = False):
    from transformers import Qwen2AudioConfig

    audio = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, num_mel_bins=80,
                 max_source_positions=50)
    text = dict(model_type=language, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=tie)
    config = Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_id=AUDIO, tie_word_embeddings=tie)
    config.architectures = ["Qwen2AudioForConditionalGeneration"]
    return config


def _tiny_model(config, directory):
    from transformers import Qwen2AudioForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2AudioForConditionalGeneration(config).float()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.1)
    model.save_pretrained(directory)
    return directory


def _samples() -> dict:
    """Two samples of SEQ tokens: sample 0 holds two clips with text between, sample 1 one."""
    from megatron_mm.data.audio_features import AudioProcessor
    from megatron_mm.data.synthetic_mm import render_tones

    processor = AudioProcessor(80, chunk_seconds=1.0, pooling_stride=2)
    rng = numpy.random.default_rng(0)
    clips = [render_tones({"pitches": ["low", "high", "mid"]}) / 32768.0,
             0.1 * rng.standard_normal(12000), render_tones({"pitches": ["high", "high"]}) / 32768.0]
    media = [processor(clip.astype(numpy.float32)) for clip in clips]
    words = lambda n: rng.integers(0, 100, n).tolist()  # noqa: E731
    rows = [words(3) + [AUDIO] * media[0][1] + words(4) + [AUDIO] * media[1][1], words(5) + [AUDIO] * media[2][1]]
    tokens = torch.tensor([row + words(SEQ - len(row)) for row in rows])
    return {"tokens": tokens, "audio_features": torch.cat([m["audio_features"] for m, _ in media])}


@torch.no_grad()
def _hf_logits(hf_dir, sample) -> torch.Tensor:
    from transformers import Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    features = sample["audio_features"]
    every_frame = torch.ones(features.shape[0], features.shape[-1], dtype=torch.long)
    return model(input_ids=sample["tokens"], input_features=features,
                 feature_attention_mask=every_frame).logits.float()


@pytest.mark.parametrize("language", ["qwen2", "llama"])
def test_qwen2_audio_logits_match_transformers(language, tmp_path):
    from megatron_mm.checkpoint.hf import export_hf, import_hf
    from megatron_mm.training.hf_parity import logit_difference, our_logits
    from megatron_mm.config import load_config

    hf_dir = _tiny_model(_hf_config(language), tmp_path / "hf")
    checkpoint = import_hf(hf_dir, tmp_path / "checkpoint")
    model_cfg = load_config(checkpoint / "config.yaml").model
    assert model_cfg.family == "qwen2_audio" and model_cfg.qkv_bias == (language == "qwen2")
    assert model_cfg.num_audio_embeddings == EMBEDDINGS and not model_cfg.tie_word_embeddings
    sample = _samples()
    assert (sample["tokens"] == AUDIO).sum() == 3 * EMBEDDINGS

    theirs = _hf_logits(hf_dir, sample)
    ours = our_logits(checkpoint, sample["tokens"], media={"audio_features": sample["audio_features"]})
    absolute, relative = logit_difference(ours, theirs)
    print(f"qwen2_audio + {language}: max |logit difference| {absolute:.2e}, relative {relative:.2e}")
    assert relative < TOLERANCE
    # The clips reach the logits: other sounds, other logits.
    silent = torch.full_like(sample["audio_features"], -0.5)
    moved = our_logits(checkpoint, sample["tokens"], media={"audio_features": silent})
    assert logit_difference(moved, ours)[1] > 1e-3

    exported = export_hf(checkpoint, tmp_path / "exported")
    original, result = hf_tensors(hf_dir), hf_tensors(exported)
    assert sorted(result) == sorted(original)
    assert all(torch.equal(result[name], tensor) for name, tensor in original.items())
    written = json.loads((exported / "config.json").read_text())
    source = json.loads((hf_dir / "config.json").read_text())
    for section in ("text_config", "audio_config"):
        assert {k: source[section].get(k) for k in written[section]} == written[section], section
    top = {k for k in written if k not in ("text_config", "audio_config", "dtype", "transformers_version")}
    assert {k: source.get(k) for k in top} == {k: written[k] for k in top}
    assert torch.equal(_hf_logits(exported, sample), theirs)


def test_unrepresentable_qwen2_audio_configs_are_refused():
    from megatron_mm.checkpoint.hf_rules import HFConversionError
    from megatron_mm.models.qwen2_audio import Qwen2AudioConfig

    hf = _hf_config("qwen2", False).to_dict()
    hf["audio_config"].update(activation_function="relu", scale_embedding=True)
    hf["text_config"].update(hidden_act="gelu")
    with pytest.raises(HFConversionError) as refused:
        Qwen2AudioConfig.from_hf_config(hf)
    for expected in ("activation_function='relu'", "scale_embedding", "hidden_act='gelu'"):
        assert expected in str(refused.value)


def test_tied_embeddings_import_as_transformers_runs_them_and_export_as_copies(tmp_path):
    """transformers' Qwen2-Audio keeps its own lm_head even under tie_word_embeddings: import reads
    it untied; a model of ours with tied embeddings exports the embedding as lm_head too."""
    from megatron_mm.checkpoint.hf import import_hf
    from megatron_mm.config import load_config
    from megatron_mm.models.qwen2_audio import Qwen2AudioConfig

    hf_dir = _tiny_model(_hf_config("qwen2", tie=True), tmp_path / "hf")
    assert not load_config(import_hf(hf_dir, tmp_path / "checkpoint") / "config.yaml").model.tie_word_embeddings
    tied = Qwen2AudioConfig(num_layers=1, tie_word_embeddings=True, audio_token_id=3, audio_max_source_positions=50)
    copies = [rule for rule in tied.hf_rules() if rule.ours == "language_model.embedding.word_embeddings.weight"]
    assert copies[0].hf == ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")
    embedding = torch.randn(5, 4)
    assert all(torch.equal(t, embedding) for t in copies[0].to_hf(embedding))
