"""The audio side: log-mel features (data/audio_features.py) and the Whisper-style encoder with its
projector (models/audio.py), against transformers' own implementations.

- Log-mel: WhisperFeatureExtractor on a synthetic tone (shorter than the chunk: padded) and on noise
  (longer: trimmed), 80 and 128 mel bins.
- Encoder: transformers' WhisperEncoder (no pooling), Qwen2AudioEncoder + Qwen2-Audio's
  multi_modal_projector (pooling 2, linear), tiny random towers with every tensor perturbed,
  weights mapped by audio_encoder_hf_rules / audio_projector_hf_rules; several clips in one call
  against one call per clip; the MLP projector against plain torch on the same weights.
- The qwen2_audio family (examples/configs/tiny_audio_lm.yaml): its generated tone-caption samples,
  its layout checks, and 150 steps of the pretraining loop after which fresh samples' captions are
  predicted far better than any model that does not hear the clip can, and far worse once silenced.

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

from megatron_mm.data.audio_features import AudioProcessor, encoder_output_length, waveform_from_record
from megatron_mm.data.synthetic_mm import SAMPLE_RATE, render_tones, write_wav
from megatron_mm.models.encoders.audio import AudioEncoderConfig
from megatron_mm.models.layers.backend import LocalBackend

LANGUAGE_HIDDEN = 48
CHUNK_SECONDS = 1  # 100 mel frames -> 50 positions
TOWER = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, num_mel_bins=80,
             max_source_positions=50)


def _tone() -> numpy.ndarray:
    """0.75 s of low, high, mid tones (float32, 16 kHz)."""
    return render_tones({"pitches": ["low", "high", "mid"]}).astype(numpy.float32) / 32768


def _noise() -> numpy.ndarray:
    """1.3 s of Gaussian noise: longer than the chunk."""
    return (0.1 * numpy.random.default_rng(0).standard_normal(int(1.3 * SAMPLE_RATE))).astype(numpy.float32)


@pytest.mark.parametrize("num_mel_bins", [80, 128])
@pytest.mark.parametrize("signal", ["tone", "noise"])
def test_log_mel_matches_whisper_feature_extractor(num_mel_bins, signal):
    from transformers import WhisperFeatureExtractor

    theirs_extractor = WhisperFeatureExtractor(feature_size=num_mel_bins, chunk_length=CHUNK_SECONDS)
    processor = AudioProcessor(num_mel_bins, CHUNK_SECONDS, pooling_stride=2)
    waveform = {"tone": _tone, "noise": _noise}[signal]()
    theirs = theirs_extractor(waveform, sampling_rate=SAMPLE_RATE, return_tensors="pt")["input_features"]
    # transformers' numpy path, on the waveform padded / trimmed as its __call__ does
    chunk = numpy.pad(waveform, (0, max(0, SAMPLE_RATE - len(waveform))))[None, :SAMPLE_RATE]
    theirs_numpy = torch.from_numpy(theirs_extractor._np_extract_fbank_features(chunk, "cpu"))
    media, count = processor(waveform)
    ours = media["audio_features"]
    vs_torch, vs_numpy = (ours - theirs).abs().max().item(), (ours - theirs_numpy).abs().max().item()
    print(f"{signal}, {num_mel_bins} mels: max |ours - transformers| {vs_torch:.2e} (torch path), "
          f"{vs_numpy:.2e} (numpy path); values span {ours.min():.2f}..{ours.max():.2f}")
    assert list(media) == ["audio_features"] and ours.shape == theirs.shape == (1, num_mel_bins, 100)
    assert ours.dtype == torch.float32
    assert vs_torch < 1e-5 and vs_numpy < 1e-4
    assert count == processor.num_placeholders(len(waveform)) == encoder_output_length(100, 2) == 25


def test_mel_filters_match_transformers():
    from transformers.audio_utils import mel_filter_bank

    from megatron_mm.data.audio_features import mel_filters

    for bins in (80, 128):
        theirs = mel_filter_bank(num_frequency_bins=201, num_mel_filters=bins, min_frequency=0.0, max_frequency=8000.0,
                                 sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
        difference = numpy.abs(mel_filters(bins).numpy().T - theirs).max()
        print(f"{bins} mel filters: max difference {difference:.1e} (largest weight {theirs.max():.1e})")
        assert difference < 1e-8


def test_processor_reads_stored_wav_records(tmp_path):
    samples = render_tones({"pitches": ["mid", "low"]})
    write_wav(tmp_path / "clip.wav", samples)
    waveform = waveform_from_record((tmp_path / "clip.wav").read_bytes())
    assert waveform.dtype == numpy.float32
    numpy.testing.assert_array_equal(waveform, samples.astype(numpy.float32) / 32768)
    # an array record is taken as 16 kHz samples already
    numpy.testing.assert_array_equal(waveform_from_record(samples), waveform)
    processor = AudioProcessor(80, CHUNK_SECONDS)
    assert torch.equal(processor(waveform)[0]["audio_features"], processor(samples.astype(numpy.float32) / 32768)[0]
                       ["audio_features"])
    with pytest.raises(ValueError):
        processor(samples)  # int16 samples are not a float waveform


def test_placeholder_counts_follow_the_chunk():
    # Whisper's 30 s: 3000 frames -> 1500 positions -> 750 after pooling (Qwen2-Audio)
    assert AudioProcessor(128, 30.0, 2).num_placeholders() == 750
    assert AudioProcessor(80, 30.0, 1).num_placeholders() == 1500
    assert AudioEncoderConfig(max_source_positions=1500, pooling_stride=2).embeddings_per_clip == 750
    assert AudioEncoderConfig(max_source_positions=50, chunk_seconds=0.5).embeddings_per_clip == 12  # 50 -> 25 -> 12
    with pytest.raises(ValueError):
        AudioProcessor(80, 0.0153)  # not a whole number of hops


def test_config_problems_are_named():
    from megatron_mm.config import ParallelConfig

    assert AudioEncoderConfig().validate(ParallelConfig()) == []
    bad = AudioEncoderConfig(num_mel_bins=64, projector_type="conv", num_attention_heads=3, chunk_seconds=2.0)
    problems = " | ".join(bad.validate(ParallelConfig(tp=2)))
    for expected in ("num_mel_bins=64", "projector_type='conv'", "num_attention_heads=3", "max_source_positions=50",
                     "parallel.tp=2"):
        assert expected in problems


# ---- the encoder, in a fresh process -------------------------------------------------------------
def _hf_towers() -> dict:
    """name -> (transformers module(s), config dict), tiny, every tensor perturbed."""
    from transformers import Qwen2AudioConfig, WhisperConfig
    from transformers.models.qwen2_audio.configuration_qwen2_audio import Qwen2AudioEncoderConfig
    from transformers.models.qwen2_audio.modeling_qwen2_audio import Qwen2AudioEncoder, Qwen2AudioMultiModalProjector
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(0)
    whisper_config = WhisperConfig(**TOWER, decoder_layers=1)
    whisper = WhisperEncoder._from_config(whisper_config).float().eval()
    torch.manual_seed(1)
    qwen2_config = Qwen2AudioConfig(audio_config=Qwen2AudioEncoderConfig(**TOWER),
                                    text_config={"model_type": "qwen2", "hidden_size": LANGUAGE_HIDDEN})
    qwen2_audio = torch.nn.ModuleDict({"audio_tower": Qwen2AudioEncoder._from_config(qwen2_config.audio_config),
                                       "multi_modal_projector": Qwen2AudioMultiModalProjector(qwen2_config)})
    towers = {"whisper": (whisper, whisper_config.to_dict()),
              "qwen2_audio": (qwen2_audio.float().eval(), qwen2_config.audio_config.to_dict())}
    with torch.no_grad():
        for module, _ in towers.values():
            for tensor in module.state_dict().values():
                tensor.add_(torch.randn_like(tensor) * 0.1)
    return towers


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def _encoder_checks_main() -> None:
    """Runs in a fresh process: a world of one, fp32."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mm.models.encoders.audio import (
        AudioEncoder,
        audio_config_from_hf,
        audio_encoder_hf_rules,
        audio_projector_hf_rules,
    )
    from megatron_mm.runtime import init_distributed, set_seed

    init_distributed()
    set_seed(0)
    language = TransformerConfig(num_layers=1, hidden_size=LANGUAGE_HIDDEN, num_attention_heads=4,
                                 params_dtype=torch.float32, gradient_accumulation_fusion=False,
                                 persist_layer_norm=False, bias_dropout_fusion=False)
    processor = AudioProcessor(80, CHUNK_SECONDS)
    clips = processor.features([_tone(), _noise(), render_tones({"pitches": ["high", "high"]}) / 32768.0])
    results = {}
    for name, (tower, hf_config) in _hf_towers().items():
        problems = []
        pooling = 1 if name == "whisper" else 2
        audio = audio_config_from_hf(hf_config, problems, pooling_stride=pooling)
        assert not problems, problems
        encoder = AudioEncoder(audio, language, LocalBackend()).eval()
        hf_state = tower.state_dict()
        rules = audio_encoder_hf_rules(audio, ours="", hf="" if name == "whisper" else "audio_tower")
        if name == "qwen2_audio":
            rules += audio_projector_hf_rules(audio, ours="projector")
        missing, unexpected = encoder.load_state_dict(
            {rule.ours: rule.to_ours([hf_state[n] for n in rule.hf]) for rule in rules}, strict=False)
        with torch.no_grad():
            if name == "whisper":
                ours, theirs = encoder.features(clips), tower(clips).last_hidden_state
            else:
                ours = encoder(clips)
                states = tower["audio_tower"](clips).last_hidden_state
                theirs = tower["multi_modal_projector"](states).reshape(-1, LANGUAGE_HIDDEN)
            one_by_one = torch.cat([encoder(clips[i:i + 1]) for i in range(len(clips))])
            batched = encoder(clips)
        back = {n: t for rule in rules for n, t in zip(rule.hf, rule.to_hf(encoder.state_dict()[rule.ours]))}
        results[name] = {
            "shape": list(ours.shape),
            "expected_shape": list(theirs.shape),
            "rows_per_clip": batched.shape[0] // len(clips),
            "unmapped": sorted(n for n in missing if not n.endswith("_extra_state")),
            "unexpected": list(unexpected),
            "hf_unread": sorted(set(hf_state) - set(back)),
            "round_trip": all(torch.equal(back[n], hf_state[n]) for n in back),
            "vs_hf_rel": _relative(ours, theirs),
            "batched_vs_single_abs": (batched - one_by_one).abs().max().item(),
            "clips_differ": (batched[:10] - batched[batched.shape[0] // 3:][:10]).abs().max().item(),
        }

    # A key bias shifts every score of a query equally: softmax ignores it.
    qkv_bias = encoder.block.layers[0].self_attention.linear_qkv.bias
    head_dim = audio.head_dim
    with torch.no_grad():
        reference = encoder(clips)
        key_rows = qkv_bias.view(audio.num_attention_heads, 3, head_dim)[:, 1]
        key_rows.add_(torch.randn_like(key_rows))
        results["key_bias_abs"] = (encoder(clips) - reference).abs().max().item()

    # The MLP projector: linear, exact GELU, linear, on the pooled, normalised states.
    audio = AudioEncoderConfig(hidden_size=32, num_layers=1, num_attention_heads=4, ffn_hidden_size=64,
                               projector_type="mlp", projector_ffn_hidden_size=40, chunk_seconds=0.5)
    encoder = AudioEncoder(audio, language, LocalBackend()).eval()
    p = {n: t for n, t in encoder.projector.named_parameters()}
    with torch.no_grad():
        states = encoder.features(clips[:, :, :audio.num_frames])
        reference = F.linear(F.gelu(F.linear(states, p["encoder.linear_fc1.weight"], p["encoder.linear_fc1.bias"])),
                             p["encoder.linear_fc2.weight"], p["encoder.linear_fc2.bias"])
        ours = encoder(clips[:, :, :audio.num_frames])
    results["mlp"] = {"shape": list(ours.shape), "expected_rows": len(clips) * audio.embeddings_per_clip,
                      "vs_reference_rel": _relative(ours, reference.reshape(-1, LANGUAGE_HIDDEN))}

    # Training: every parameter but the fixed positions gets a gradient.
    encoder.train()
    encoder(clips[:, :, :audio.num_frames]).square().sum().backward()
    results["grads"] = {n: (t.grad is not None and t.grad.abs().max().item() > 0, t.requires_grad)
                        for n, t in encoder.named_parameters()}
    print(json.dumps(results))


@pytest.fixture(scope="module")
def encoder_checks() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    result = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["whisper", "qwen2_audio"])
def test_encoder_matches_transformers(encoder_checks, name):
    c = encoder_checks[name]
    print(f"{name}: max |ours - transformers| = {c['vs_hf_rel']:.2e} of the largest; several clips vs one by one "
          f"{c['batched_vs_single_abs']:.1e}")
    # Whisper: 100 frames -> 50 states of width 32; Qwen2-Audio: pooled to 25, projected to the language width
    assert c["shape"] == c["expected_shape"] == ([3, 50, 32] if name == "whisper" else [3 * 25, LANGUAGE_HIDDEN])
    assert c["rows_per_clip"] == (50 if name == "whisper" else 25)
    assert c["unmapped"] == ([] if name == "qwen2_audio" else ["projector.encoder.bias", "projector.encoder.weight"])
    assert c["unexpected"] == [] and c["hf_unread"] == [] and c["round_trip"]
    assert c["vs_hf_rel"] < 1e-5


@pytest.mark.parametrize("name", ["whisper", "qwen2_audio"])
def test_clips_in_one_call_equal_one_call_each(encoder_checks, name):
    c = encoder_checks[name]
    assert c["batched_vs_single_abs"] < 1e-5
    assert c["clips_differ"] > 1e-2  # and the clips do give different rows


def test_key_bias_cannot_change_attention(encoder_checks):
    print(f"random key bias: output moved by {encoder_checks['key_bias_abs']:.1e}")
    assert encoder_checks["key_bias_abs"] < 1e-5


def test_mlp_projector_matches_plain_torch(encoder_checks):
    c = encoder_checks["mlp"]
    assert c["shape"] == [c["expected_rows"], LANGUAGE_HIDDEN] and c["expected_rows"] == 3 * 12
    assert c["vs_reference_rel"] < 1e-6


def test_positions_stay_fixed_and_the_rest_trains(encoder_checks):
    grads = encoder_checks["grads"]
    assert grads.pop("position_embeddings") == [False, False]
    assert all(has_grad and trainable for has_grad, trainable in grads.values()), grads


# ---- the tiny audio-language model learns from the clips, in a fresh process -----------------------
TINY_AUDIO_LM = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny_audio_lm.yaml"
LEARNING_STEPS = 150


def _audio_blind_loss() -> float:
    """The lowest mean caption loss without hearing the clip: 2-4 pitches drawn uniformly, each of
    three; only the caption's length so far tells anything about eod."""
    import math

    lengths = (2, 3, 4)
    total = tokens = 0.0
    for n in lengths:
        for k in range(n + 1):  # predicting word k+1 (or eod when k == n) after k words
            longer = sum(1 for m in lengths if m > k) / sum(1 for m in lengths if m >= k)
            total += -math.log(1.0 - longer) if k == n else -math.log(longer / 3)
        tokens += n + 1
    return total / tokens


def test_generated_samples_hold_one_clip_and_its_caption():
    from megatron_mm.config import load_config
    from megatron_mm.data.mock_audio_caption import caption_vocabulary
    from megatron_mm.data.synthetic_mm import audio_caption
    from megatron_mm.training.batches import MicroBatches, build_datasets

    cfg = load_config(TINY_AUDIO_LM)
    train, valid, test = build_datasets(cfg, None, (8, 4, 0))
    assert (len(train), len(valid), test) == (8, 4, None)
    n, audio_id = cfg.model.num_audio_embeddings, cfg.model.audio_token_id
    assert n == 25  # 1 s: 100 frames -> 50 positions -> pooled by 2
    sample = train[0]
    assert sample["audio_features"].shape == (1, 80, 100)
    assert (sample["tokens"] == audio_id).sum() == n and (sample["tokens"][1:1 + n] == audio_id).all()
    words = [caption_vocabulary()[w] for w in audio_caption(train.attributes(0)).split()]
    caption = sample["loss_mask"].nonzero().squeeze(1)
    assert sample["labels"][caption].tolist() == words + [0]  # the pitches in order, then eod
    batch = next(MicroBatches(train, 0, 4, 0, 1))
    assert batch["audio_features"].shape == (4, 80, 100) and batch["tokens"].shape == (4, cfg.data.seq_length)


def test_layout_problems_name_the_audio_field():
    from megatron_mm.config import ConfigError, load_config
    from megatron_mm.runtime.layout import validate_layout

    for world, overrides, message in (
            (2, ["parallel.tp=2", "model.audio_num_attention_heads=3", "model.audio_hidden_size=48"],
             "audio num_attention_heads=3 is not divisible by parallel.tp=2"),
            (1, ["model.audio_chunk_seconds=2.0"], "max_source_positions=50"),
            (1, ["model.max_position_embeddings=20", "data.seq_length=20"], "leaves no room for text"),
            (1, ["model.audio_token_id=300"], "model.audio_token_id=300 is outside the vocabulary")):
        with pytest.raises(ConfigError) as err:
            validate_layout(load_config(TINY_AUDIO_LM, overrides), world)
        assert message in str(err.value)


def _learning_main(output_dir: str) -> None:
    """Trains tiny_audio_lm with the pretraining loop, then measures the caption loss of fresh
    samples with their clips and with every clip replaced by silence."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from megatron_mm.config import load_config
    from megatron_mm.data.mock_audio_caption import MockAudioCaptionDataset
    from megatron_mm.training import loop as pretrain
    from megatron_mm.training.batches import MicroBatches

    cfg = load_config(TINY_AUDIO_LM, [f"train.train_iters={LEARNING_STEPS}", "train.lr_warmup_iters=10",
                                      "train.lr_decay_style=constant", "train.log_interval=50", "train.save_interval=0",
                                      f"train.output_dir={output_dir}"])
    trainer = pretrain.setup(cfg)
    losses = pretrain.train(trainer)
    model = trainer.model[0].eval()
    batch = next(MicroBatches(MockAudioCaptionDataset(cfg, 64, split=2), 0, 64, 0, 1))
    silence = cfg.model.media_processors()["audio"](numpy.zeros(SAMPLE_RATE, numpy.float32))[0]["audio_features"]
    results = {"first_loss": losses[1], "last_loss": losses[LEARNING_STEPS]}
    for name, features in (("with_audio", batch["audio_features"]),
                           ("silenced", silence.expand_as(batch["audio_features"]).contiguous())):
        with torch.no_grad():
            per_token = pretrain.model_forward(model, {**batch, "audio_features": features}, with_labels=True)
        results[name] = ((per_token * batch["loss_mask"]).sum() / batch["loss_mask"].sum()).item()
    print(json.dumps(results))


def test_tiny_audio_lm_learns_the_pitches_from_the_clips(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    result = subprocess.run([sys.executable, __file__, "learning", str(tmp_path)], capture_output=True, text=True,
                            env=env, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    c = json.loads(result.stdout.strip().splitlines()[-1])
    blind = _audio_blind_loss()
    print(f"{LEARNING_STEPS} steps: training loss {c['first_loss']:.2f} -> {c['last_loss']:.2f}; fresh samples "
          f"{c['with_audio']:.3f} with their clips, {c['silenced']:.3f} silenced; best without audio {blind:.3f}")
    assert c["with_audio"] < 0.5 * blind  # what no audio-blind model can reach
    assert c["silenced"] > blind > c["with_audio"]


if __name__ == "__main__":
    if sys.argv[1:2] == ["learning"]:
        _learning_main(sys.argv[2])
    else:
        _encoder_checks_main()
