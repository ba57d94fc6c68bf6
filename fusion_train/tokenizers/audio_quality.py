"""Measures of audio that the codec's training loss, its report and the demo's sound check share:
log-mel spectrograms at several scales, SI-SNR, and the pitch of a tonal sound."""

from __future__ import annotations

import math

import numpy as np
import torch

MEL_SCALES = (256, 512, 1024)  # FFT sizes: short windows see timing, long ones see pitch
MEL_BANDS = 64
MEL_FLOOR = 1e-2  # added to mel magnitudes before the log: 40 dB under a tone's band, so near-silence does not dominate


def _hz_to_mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def _mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel) / 2595.0) - 1.0)


def mel_filters(n_fft: int, sampling_rate: int, bands: int = MEL_BANDS) -> torch.Tensor:
    """Triangular filters [bands, n_fft // 2 + 1] evenly spaced in mel (HTK's formula), unnormalised."""
    bin_hz = np.linspace(0, sampling_rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(0, _hz_to_mel(sampling_rate / 2), bands + 2))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising, falling = (bin_hz - lower) / (centre - lower), (upper - bin_hz) / (upper - centre)
    return torch.from_numpy(np.clip(np.minimum(rising, falling), 0, None)).float()


def mel(audio: torch.Tensor, sampling_rate: int, n_fft: int) -> torch.Tensor:
    """audio [..., samples] -> mel magnitudes [..., bands, frames] with a quarter-window hop."""
    window = torch.hann_window(n_fft, device=audio.device)
    spectrum = torch.stft(audio.reshape(-1, audio.shape[-1]), n_fft, n_fft // 4, window=window, return_complex=True)
    bands = min(MEL_BANDS, n_fft // 4)  # a short window has too few bins for many bands
    magnitudes = mel_filters(n_fft, sampling_rate, bands).to(audio.device) @ spectrum.abs()
    return magnitudes.reshape(*audio.shape[:-1], *magnitudes.shape[-2:])


def _scales(samples: int) -> list[int]:
    return [n for n in MEL_SCALES if n <= samples]


def mel_loss(reconstruction: torch.Tensor, target: torch.Tensor, sampling_rate: int) -> torch.Tensor:
    """EnCodec's frequency loss: L1 plus L2 between mel magnitudes, averaged over MEL_SCALES. On
    magnitudes, not logs: a log turns the near-silence between notes into large, phase-blind
    gradients that drowned the waveform term (a 4-clip overfit reached waveform correlation 0.997
    in 200 steps without a log-mel term and stayed near 0 with one)."""
    scales = _scales(target.shape[-1])
    differences = [mel(reconstruction, sampling_rate, n) - mel(target, sampling_rate, n) for n in scales]
    return sum(d.abs().mean() + d.pow(2).mean() for d in differences) / len(scales)


def mel_distance(reconstruction: torch.Tensor, target: torch.Tensor, sampling_rate: int) -> torch.Tensor:
    """The codec literature's reported measure: mean L1 between log-mel spectrograms over MEL_SCALES."""
    scales = _scales(target.shape[-1])
    return sum((torch.log(mel(reconstruction, sampling_rate, n) + MEL_FLOOR)
                - torch.log(mel(target, sampling_rate, n) + MEL_FLOOR)).abs().mean() for n in scales) / len(scales)  # fmt: skip


def si_snr(estimate: np.ndarray, reference: np.ndarray) -> float:
    """Scale-invariant signal-to-noise ratio in dB (Le Roux et al., 2019): the estimate's error
    after the best scaling of the reference, so loudness does not count."""
    estimate, reference = estimate - estimate.mean(), reference - reference.mean()
    target = (estimate @ reference) / (reference @ reference + 1e-12) * reference
    noise = estimate - target
    return float(10 * np.log10((target @ target + 1e-12) / (noise @ noise + 1e-12)))


def pitch(samples: np.ndarray, sampling_rate: int, lowest: float = 60.0, highest: float = 2000.0) -> float | None:
    """The fundamental frequency of a tonal sound, in Hz, by autocorrelation (the first strong peak
    of the normalised autocorrelation within the lag range, refined by a parabola); None when no
    lag correlates well (noise, silence)."""
    x = samples.astype(np.float64) - samples.mean()
    if not np.any(x):
        return None
    n = len(x)
    spectrum = np.fft.rfft(x, 2 * n)
    correlation = np.fft.irfft(spectrum * np.conj(spectrum))[:n]
    correlation /= correlation[0]
    first, last = int(sampling_rate / highest), min(n - 2, int(sampling_rate / lowest))
    if last <= first:
        return None
    window = correlation[first : last + 1]
    best = window.max()
    if best < 0.5:
        return None
    lag = first + int(np.argmax(window >= 0.9 * best))  # the first lag nearly as good: not an octave below
    while lag + 1 <= last and correlation[lag + 1] > correlation[lag]:
        lag += 1
    left, centre, right = correlation[lag - 1 : lag + 2]
    curvature = left - 2 * centre + right
    shift = float(np.clip(0.5 * (left - right) / curvature, -0.5, 0.5)) if curvature < 0 else 0.0  # a peak only
    return sampling_rate / (lag + shift)


def semitones(frequency: float, reference: float) -> float:
    return 12 * math.log2(frequency / reference)
