"""clsp_jax.features.fbank against Lhotse Fbank(FbankConfig(num_mel_bins=128)) outputs (fixture)."""

import pathlib

import jax
import numpy as np
import pytest

from clsp_jax.features import ENERGY_FLOOR, LOG_EPSILON, fbank, mel_banks, num_frames, povey_window

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "fbank128_lhotse.npz"
LOG_FLOOR = np.log(np.float32(ENERGY_FLOOR))
NUM_WAVES = 5  # speech, speech, white noise, near-silence, 440 Hz tone


@pytest.fixture(scope="module")
def ref():
    data = np.load(FIXTURE)
    return [(data[f"wave_{i}"], data[f"fbank_{i}"]) for i in range(NUM_WAVES)]


def _single(wave):
    feats, lens = fbank(wave[None], np.array([len(wave)]))
    return np.asarray(feats[0]), int(lens[0])


@pytest.mark.parametrize("i", range(NUM_WAVES))
def test_matches_lhotse(ref, i):
    wave, expected = ref[i]
    feats, length = _single(wave)
    assert num_frames(len(wave)) == length == feats.shape[0] == expected.shape[0]
    err = np.abs(feats - expected)
    # Measured max: 6.0e-4, 6.2e-4, 2.5e-4, 8.4e-5, 5.1e-4. The largest errors sit ~17 nats below the
    # frame's peak, where float32 FFT round-off of either implementation dominates.
    assert err.max() <= 1e-3
    strong = expected > expected.max(axis=1, keepdims=True) - 10.0
    assert err[strong].max() <= 3e-4
    # Same cells at the energy floor (includes all of the near-silence wave's floored bins).
    np.testing.assert_array_equal(feats <= LOG_FLOOR + 1e-5, expected <= LOG_FLOOR + 1e-5)


def test_a_nan_sample_makes_its_frames_nan():
    """Bad audio must show (the train step then skips the update), not turn into silence at the floor."""
    wave = np.random.default_rng(0).standard_normal((2, 8000)).astype(np.float32)
    wave[1, 100] = np.nan  # in frames 0 and 1 only
    feats = np.asarray(fbank(wave, np.array([8000, 8000]))[0])
    assert np.isnan(feats[1, :2]).all()
    assert np.isfinite(feats[1, 2:]).all() and np.isfinite(feats[0]).all()


def test_num_frames():
    samples = [0, 79, 80, 239, 240, 4000, 32123, 52939]
    expected = [0, 0, 1, 1, 2, 25, 201, 331]
    assert [num_frames(n) for n in samples] == expected
    np.testing.assert_array_equal(num_frames(np.array(samples)), expected)
    with pytest.raises(ValueError, match="num_samples"):
        num_frames(-1)


def test_batch_equals_one_at_a_time(ref):
    waves = [w for w, _ in ref]
    max_len = max(len(w) for w in waves) + 1000
    rng = np.random.default_rng(0)
    # Garbage, not zeros, past each length: a row must only ever read its own valid samples.
    batch = rng.standard_normal((len(waves), max_len)).astype(np.float32)
    for row, w in zip(batch, waves):
        row[: len(w)] = w
    feats, lens = fbank(batch, np.array([len(w) for w in waves]))
    assert feats.shape == (len(waves), num_frames(max_len), 128) and feats.dtype == np.float32
    feats = np.asarray(feats)
    for b, w in enumerate(waves):
        single, length = _single(w)
        assert int(lens[b]) == length
        np.testing.assert_allclose(feats[b, :length], single, rtol=0, atol=1e-5)
        assert (feats[b, length:] == np.float32(LOG_EPSILON)).all()


def test_jit(ref):
    wave = ref[0][0]
    batch, lens = np.stack([wave, wave * 0.5]), np.array([len(wave), len(wave) - 3000])
    eager = fbank(batch, lens)
    jitted = jax.jit(fbank)(batch, lens)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


@pytest.mark.parametrize("extra", [1, 80, 160, 5000])
@pytest.mark.parametrize("fill", ["zeros", "noise"])
def test_padding_invariance(ref, extra, fill):
    wave = ref[2][0]
    noise = np.random.default_rng(extra).uniform(-1, 1, extra).astype(np.float32)
    pad = np.zeros(extra, np.float32) if fill == "zeros" else noise
    feats, lens = fbank(np.concatenate([wave, pad])[None], np.array([len(wave)]))
    single, length = _single(wave)
    assert int(lens[0]) == length
    np.testing.assert_allclose(np.asarray(feats[0, :length]), single, rtol=0, atol=1e-5)
    assert (np.asarray(feats[0, length:]) == np.float32(LOG_EPSILON)).all()  # Lhotse's padding value


def _kaldi_loop_fbank(wave):
    """Frame-by-frame numpy float64 oracle; mirrors out-of-range samples until inside, as Kaldi does."""
    n, window, shift = len(wave), 400, 160
    banks, win = mel_banks(128, 512, 16000, 20.0, -400.0), povey_window(window)
    out = []
    for f in range(num_frames(n)):
        frame = np.empty(window)
        for s in range(window):
            pos = f * shift - (window - shift) // 2 + s
            while pos < 0 or pos >= n:
                pos = -pos - 1 if pos < 0 else 2 * n - 1 - pos
            frame[s] = wave[pos]
        frame -= frame.mean()
        frame = (frame - 0.97 * np.concatenate([frame[:1], frame[:-1]])) * win
        power = np.abs(np.fft.rfft(frame, 512)) ** 2
        out.append(np.log(np.maximum(power @ banks, ENERGY_FLOOR)))
    return np.array(out).reshape(-1, 128)


@pytest.mark.parametrize("length", [0, 1, 79, 80, 100, 250, 399, 1000])
def test_short_waves(length):
    rng = np.random.default_rng(length)
    wave = (0.3 * rng.standard_normal(length)).astype(np.float32)
    feats, lens = fbank(np.concatenate([wave, np.zeros(400, np.float32)])[None], np.array([length]))
    feats = np.asarray(feats[0])
    assert np.isfinite(feats).all()
    assert int(lens[0]) == num_frames(length)
    np.testing.assert_allclose(feats[: int(lens[0])], _kaldi_loop_fbank(wave), rtol=0, atol=2e-3)
    assert (feats[int(lens[0]) :] == np.float32(LOG_EPSILON)).all()


def test_silence_is_floor_not_nan():
    feats, lens = fbank(np.zeros((2, 1600), np.float32), np.array([1600, 0]))
    np.testing.assert_array_equal(np.asarray(lens), [10, 0])
    np.testing.assert_array_equal(np.asarray(feats[0]), np.full((10, 128), LOG_FLOOR, np.float32))
    assert (np.asarray(feats[1]) == np.float32(LOG_EPSILON)).all()
    assert LOG_EPSILON == pytest.approx(-23.0258509)  # lhotse.utils.LOG_EPSILON = log(1e-10)


@pytest.mark.parametrize(
    "waveforms, wave_lens, match",
    [
        (np.zeros(100, np.float32), np.array([100]), "waveforms must be"),
        (np.zeros((1, 100), np.int16), np.array([100]), "floating point"),
        (np.zeros((2, 100), np.float32), np.array([100]), "wave_lens must have shape"),
        (np.zeros((1, 100), np.float32), np.array([100.0]), "integer sample counts"),
        (np.zeros((1, 100), np.float32), np.array([101]), r"lie in \[0, 100\]"),
        (np.zeros((1, 100), np.float32), np.array([-1]), r"lie in \[0, 100\]"),
    ],
)
def test_rejects_bad_input(waveforms, wave_lens, match):
    with pytest.raises(ValueError, match=match):
        fbank(waveforms, wave_lens)


def test_rejects_bad_mel_range():
    with pytest.raises(ValueError, match="low_freq"):
        fbank(np.zeros((1, 400), np.float32), np.array([400]), low_freq=7700.0)
