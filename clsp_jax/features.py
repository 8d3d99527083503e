"""Kaldi-style log-mel filterbank features, computed in JAX on the accelerator.

Matches Lhotse ``Fbank(FbankConfig(num_mel_bins=128))`` (its torch ``Wav2LogFilterBank``), which is what
the CLSP authors feed their speech tower:

- frames of 25 ms every 10 ms; ``snip_edges=False``: frame ``f`` starts at sample ``f*shift - (win-shift)//2``
  and samples outside ``[0, n)`` are mirrored about the edges, edge sample included (x[-1] = x[0]), as
  Kaldi does; ``(n + shift//2) // shift`` frames for ``n`` samples;
- per frame: remove the mean, pre-emphasis 0.97 (the first sample is emphasised against itself),
  povey window (symmetric Hann ** 0.85), zero-pad to the next power of two, power spectrum;
- mel triangles between ``low_freq`` and ``high_freq`` (negative: offset from Nyquist) on Kaldi's mel
  scale 1127 ln(1 + f/700), none on the Nyquist bin; log(max(energy, float32 eps)).

No dither, no energy coefficient. Waves too short for one mirroring (under ~200 samples) are mirrored
repeatedly, as Kaldi's extractor does; Lhotse reads past its buffer there.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16000
FRAME_LENGTH_S = 0.025
FRAME_SHIFT_S = 0.010
PREEMPH_COEFF = 0.97
# Lhotse floors mel energies at torch.finfo(torch.float32).eps before the log.
ENERGY_FLOOR = float(np.finfo(np.float32).eps)
# Lhotse's LOG_EPSILON, ln(1e-10): the value its collation pads a batch's feature matrices with, so the value
# the authors' speech tower (whose first convolutions see padded frames) gets past each clip's end.
LOG_EPSILON = math.log(1e-10)


def _window_and_shift(sample_rate: int) -> tuple[int, int]:
    return int(FRAME_LENGTH_S * sample_rate), int(FRAME_SHIFT_S * sample_rate)


def num_frames(num_samples, *, sample_rate: int = SAMPLE_RATE):
    """Number of fbank frames for ``num_samples`` samples (int, or an integer numpy/jax array).

    Same rule as Lhotse's ``compute_num_frames_from_samples`` with a 10 ms shift: ``(n + shift//2) // shift``.
    """
    _, shift = _window_and_shift(sample_rate)
    if isinstance(num_samples, (int, np.integer)) and num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    return (num_samples + shift // 2) // shift


def _mel(freq_hz):
    return 1127.0 * np.log1p(np.asarray(freq_hz, np.float64) / 700.0)


@functools.lru_cache(maxsize=None)
def mel_banks(num_mel_bins: int, fft_size: int, sample_rate: int, low_freq: float, high_freq: float) -> np.ndarray:
    """Kaldi mel filterbank as a matrix [fft_size//2 + 1, num_mel_bins] (float32, power spectrum -> mel)."""
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist
    if num_mel_bins < 4:
        raise ValueError(f"num_mel_bins must be at least 4, got {num_mel_bins}")
    if not (0.0 <= low_freq < high_freq <= nyquist):
        raise ValueError(
            f"need 0 <= low_freq < high_freq <= Nyquist; got low_freq={low_freq}, high_freq={high_freq} "
            f"(negative high_freq counts down from Nyquist {nyquist})"
        )
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    delta = (mel_high - mel_low) / (num_mel_bins + 1)
    left = mel_low + delta * np.arange(num_mel_bins)[:, None]
    center, right = left + delta, left + 2 * delta
    # Kaldi builds triangles on the fft_size//2 bins below Nyquist; the Nyquist bin gets weight 0.
    mel_of_bin = _mel(np.arange(fft_size // 2) * sample_rate / fft_size)[None, :]
    rising = (mel_of_bin - left) / (center - left)
    falling = (right - mel_of_bin) / (right - center)
    banks = np.maximum(0.0, np.minimum(rising, falling))
    banks = np.concatenate([banks, np.zeros((num_mel_bins, 1))], axis=1)
    return banks.T.astype(np.float32)


def povey_window(length: int) -> np.ndarray:
    """Kaldi's povey window [length] (float32): symmetric Hann raised to 0.85."""
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(length) / (length - 1))
    return (hann**0.85).astype(np.float32)


def _mirror_index(pos, length):
    """Index into [0, length) of position ``pos`` after mirroring about both edges, edges repeated.

    Kaldi reflects until inside (x[-1-k] = x[k], x[n+k] = x[n-1-k]); that is periodic with period 2n.
    """
    length = jnp.maximum(length, 1)
    folded = jnp.mod(pos, 2 * length)
    return jnp.where(folded < length, folded, 2 * length - 1 - folded)


@functools.partial(jax.jit, static_argnames=("num_mel_bins", "sample_rate", "low_freq", "high_freq"))
def _fbank(waveforms, wave_lens, *, num_mel_bins, sample_rate, low_freq, high_freq):
    batch, max_samples = waveforms.shape
    window, shift = _window_and_shift(sample_rate)
    fft_size = 1 << (window - 1).bit_length()
    frames_out = num_frames(max_samples, sample_rate=sample_rate)
    wave_lens = jnp.clip(wave_lens.astype(jnp.int32), 0, max_samples)
    feat_lens = num_frames(wave_lens, sample_rate=sample_rate).astype(jnp.int32)
    if frames_out == 0:
        return jnp.zeros((batch, 0, num_mel_bins), jnp.float32), feat_lens

    # One gather builds each row's edge-mirrored signal (mirrored at its own length, never at N); frames
    # are then cut by reshaping into shift-sized chunks, so the gather is [B, ~T*shift], not [B, T, window].
    chunks_needed = -(-window // shift)
    padded_len = (frames_out + chunks_needed - 1) * shift
    positions = jnp.arange(padded_len) - (window - shift) // 2
    index = _mirror_index(positions[None, :], wave_lens[:, None])
    signal = jnp.take_along_axis(waveforms.astype(jnp.float32), index, axis=1)
    chunks = signal.reshape(batch, -1, shift)
    frames = jnp.concatenate([chunks[:, c : c + frames_out] for c in range(chunks_needed)], axis=-1)
    frames = frames[..., :window]

    frames = frames - jnp.mean(frames, axis=-1, keepdims=True)
    previous = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
    frames = (frames - PREEMPH_COEFF * previous) * povey_window(window)

    spectrum = jnp.fft.rfft(frames, n=fft_size, axis=-1)
    power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)
    banks = mel_banks(num_mel_bins, fft_size, sample_rate, low_freq, high_freq)
    # HIGHEST: TPU/GPU would otherwise run this float32 matmul in bf16/tf32 passes.
    mel = jnp.matmul(power, banks, precision=jax.lax.Precision.HIGHEST)
    feats = jnp.log(jnp.maximum(mel, ENERGY_FLOOR))

    valid = jnp.arange(frames_out)[None, :] < feat_lens[:, None]
    return jnp.where(valid[..., None], feats, LOG_EPSILON), feat_lens


def fbank(
    waveforms,
    wave_lens,
    *,
    num_mel_bins: int = 128,
    sample_rate: int = SAMPLE_RATE,
    low_freq: float = 20.0,
    high_freq: float = -400.0,
):
    """Log-mel filterbank of a padded batch of waves, as Lhotse ``Fbank`` computes each wave alone.

    Args:
      waveforms: [B, N] floating, zero-padded (values past each length are ignored), amplitude in [-1, 1].
      wave_lens: [B] integer sample counts, 0 <= len <= N.
      num_mel_bins, sample_rate: mel bins and sampling rate in Hz.
      low_freq, high_freq: mel range in Hz; a non-positive high_freq counts down from Nyquist.

    Returns:
      feats [B, T, num_mel_bins] float32 natural-log mel energies, T = num_frames(N); frames at and past
      feat_lens hold LOG_EPSILON (ln 1e-10), as Lhotse pads a batch. feat_lens [B] int32 = num_frames(wave_lens).

    Jittable; under jit the length bounds cannot be checked and lengths are clipped to [0, N].
    """
    waveforms = jnp.asarray(waveforms)
    wave_lens = jnp.asarray(wave_lens)
    if waveforms.ndim != 2:
        raise ValueError(f"waveforms must be [batch, samples], got shape {waveforms.shape}")
    if not jnp.issubdtype(waveforms.dtype, jnp.floating):
        raise ValueError(f"waveforms must be floating point, got dtype {waveforms.dtype}")
    if wave_lens.shape != waveforms.shape[:1]:
        raise ValueError(f"wave_lens must have shape {waveforms.shape[:1]}, got {wave_lens.shape}")
    if not jnp.issubdtype(wave_lens.dtype, jnp.integer):
        raise ValueError(f"wave_lens must be integer sample counts, got dtype {wave_lens.dtype}")
    if not isinstance(wave_lens, jax.core.Tracer):
        lens = np.asarray(wave_lens)
        if lens.size and (lens.min() < 0 or lens.max() > waveforms.shape[1]):
            raise ValueError(f"wave_lens must lie in [0, {waveforms.shape[1]}], got {lens.tolist()}")
    if not isinstance(sample_rate, int) or sample_rate < 100:
        raise ValueError(f"sample_rate must be an integer >= 100 Hz (a 10 ms shift of >= 1 sample), got {sample_rate}")
    return _fbank(
        waveforms,
        wave_lens,
        num_mel_bins=num_mel_bins,
        sample_rate=sample_rate,
        low_freq=float(low_freq),
        high_freq=float(high_freq),
    )
