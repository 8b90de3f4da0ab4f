"""Whisper-style log-mel features, computed in the data pipeline, and the audio processor that turns
one 16 kHz waveform into the audio encoder's input (models/audio.py) and its placeholder count.

The waveform is zero-padded or trimmed to a fixed chunk (Whisper: 30 s), then: a centred STFT
(periodic Hann window of n_fft samples, reflect padding, hop samples apart), power spectrum, Slaney
mel filters up to 8 kHz, log10 of the energies floored at 1e-10, everything below the clip's
maximum - 8 raised to it (an 80 dB range), and (x + 4) / 4. The STFT's last frame is dropped, so a
chunk of `chunk_samples` gives chunk_samples / hop frames (3000 for 30 s).

Every clip of a micro-batch has the same number of frames, so the batch stacks them; the encoder
attends over the whole chunk (silence included), as Whisper does.
"""

from __future__ import annotations

import math
from typing import Union

import numpy
import torch

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms windows
HOP_LENGTH = 160  # 10 ms apart
MEL_BINS = (80, 128)  # Whisper up to large-v2 / large-v3
MAX_FREQUENCY = 8000.0
LOG_FLOOR = 1e-10
DYNAMIC_RANGE = 8.0  # log10 units below the clip's maximum kept: 80 dB

# Slaney's mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above.
_LINEAR_HZ_PER_MEL = 200.0 / 3
_BREAK_HZ = 1000.0
_BREAK_MEL = _BREAK_HZ / _LINEAR_HZ_PER_MEL
_LOG_STEP = math.log(6.4) / 27.0  # 27 mels per factor 6.4 above the break


def hertz_to_mel(hertz: numpy.ndarray) -> numpy.ndarray:
    hertz = numpy.asarray(hertz, dtype=numpy.float64)
    linear = hertz / _LINEAR_HZ_PER_MEL
    logarithmic = _BREAK_MEL + numpy.log(numpy.maximum(hertz, _BREAK_HZ) / _BREAK_HZ) / _LOG_STEP
    return numpy.where(hertz >= _BREAK_HZ, logarithmic, linear)


def mel_to_hertz(mels: numpy.ndarray) -> numpy.ndarray:
    mels = numpy.asarray(mels, dtype=numpy.float64)
    linear = mels * _LINEAR_HZ_PER_MEL
    logarithmic = _BREAK_HZ * numpy.exp(_LOG_STEP * (numpy.maximum(mels, _BREAK_MEL) - _BREAK_MEL))
    return numpy.where(mels >= _BREAK_MEL, logarithmic, linear)


def mel_filters(num_mel_bins: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                max_frequency: float = MAX_FREQUENCY) -> torch.Tensor:
    """[num_mel_bins, n_fft // 2 + 1] triangular filters, evenly spaced on the Slaney mel scale from
    0 Hz to max_frequency, each scaled to unit area (Slaney normalisation: 2 / its width in Hz)."""
    bin_hertz = numpy.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    edges = mel_to_hertz(numpy.linspace(hertz_to_mel(0.0), hertz_to_mel(max_frequency), num_mel_bins + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bin_hertz[None, :] - lower) / (centre - lower)
    falling = (upper - bin_hertz[None, :]) / (upper - centre)
    triangles = numpy.maximum(0.0, numpy.minimum(rising, falling))
    return torch.from_numpy(triangles * (2.0 / (upper - lower))).to(torch.float32)


def log_mel_spectrogram(waveforms: torch.Tensor, filters: torch.Tensor, n_fft: int = N_FFT,
                        hop_length: int = HOP_LENGTH) -> torch.Tensor:
    """[clips, samples] float32 -> [clips, num_mel_bins, samples // hop_length] normalised log-mel,
    each clip floored relative to its own maximum."""
    window = torch.hann_window(n_fft, dtype=torch.float32, device=waveforms.device)
    spectrum = torch.stft(waveforms.to(torch.float32), n_fft, hop_length, window=window, center=True,
                          pad_mode="reflect", return_complex=True)
    power = spectrum[..., :-1].abs().square()  # [clips, n_fft // 2 + 1, frames]
    log_mel = torch.clamp(filters.to(power.device) @ power, min=LOG_FLOOR).log10()
    clip_max = log_mel.amax(dim=(-2, -1), keepdim=True)
    return (torch.maximum(log_mel, clip_max - DYNAMIC_RANGE) + 4.0) / 4.0


def pad_or_trim(waveform: numpy.ndarray, samples: int) -> numpy.ndarray:
    """The first `samples` samples, zero-padded at the end when the clip is shorter."""
    waveform = numpy.asarray(waveform, dtype=numpy.float32)[:samples]
    return numpy.pad(waveform, (0, samples - len(waveform)))


def encoder_output_length(frames: int, pooling_stride: int) -> int:
    """Embeddings an audio encoder gives for `frames` mel frames: its second convolution (kernel 3,
    padding 1, stride 2) halves them, rounding up; the projector's average pooling then keeps
    whole windows of `pooling_stride`."""
    return ((frames - 1) // 2 + 1) // pooling_stride


def waveform_from_record(data: Union[bytes, numpy.ndarray]) -> numpy.ndarray:
    """A stored audio record (WAV file bytes, or an array of samples at 16 kHz; data/mm_indexed.py)
    as a float32 mono 16 kHz waveform: channels averaged, other rates resampled."""
    from megatron_mm.data.mm_indexed import MediaRecord
    from megatron_mm.data.mm_training import decode_media

    return decode_media(MediaRecord("audio", 0, data))


class AudioProcessor:
    """float32 mono 16 kHz waveform -> ({"audio_features": [1, num_mel_bins, frames]}, placeholders).

    Every clip is padded or trimmed to `chunk_seconds`, so the placeholder count is the same for all
    clips: the encoder's output length for `num_frames` frames after `pooling_stride` pooling."""

    modality = "audio"

    def __init__(self, num_mel_bins: int = 80, chunk_seconds: float = 30.0, pooling_stride: int = 2,
                 n_fft: int = N_FFT, hop_length: int = HOP_LENGTH):
        chunk_samples = round(chunk_seconds * SAMPLE_RATE)
        if chunk_samples <= 0 or chunk_samples % hop_length:
            raise ValueError(f"chunk_seconds={chunk_seconds} is not a positive multiple of the {hop_length}-sample hop")
        if num_mel_bins < 1 or pooling_stride < 1:
            raise ValueError("num_mel_bins and pooling_stride must be positive")
        self.num_mel_bins, self.pooling_stride = num_mel_bins, pooling_stride
        self.n_fft, self.hop_length, self.chunk_samples = n_fft, hop_length, chunk_samples
        self.filters = mel_filters(num_mel_bins, n_fft)

    @property
    def num_frames(self) -> int:
        return self.chunk_samples // self.hop_length

    def num_placeholders(self, samples: int = 0) -> int:
        """The same for every clip, whatever its length (`samples`): all are cut to one chunk."""
        return encoder_output_length(self.num_frames, self.pooling_stride)

    def features(self, waveforms: list[numpy.ndarray]) -> torch.Tensor:
        """[clips, num_mel_bins, num_frames] for several waveforms at once."""
        chunks = torch.from_numpy(numpy.stack([pad_or_trim(w, self.chunk_samples) for w in waveforms]))
        return log_mel_spectrogram(chunks, self.filters, self.n_fft, self.hop_length)

    def __call__(self, waveform: numpy.ndarray) -> tuple[dict[str, torch.Tensor], int]:
        waveform = numpy.asarray(waveform)
        if waveform.ndim != 1 or waveform.dtype.kind != "f":
            raise ValueError(f"audio items are 1-D float mono waveforms at {SAMPLE_RATE} Hz, got "
                             f"{waveform.dtype} of shape {waveform.shape}")
        return {"audio_features": self.features([waveform])}, self.num_placeholders()
