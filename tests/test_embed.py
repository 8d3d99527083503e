"""`python -m clsp_jax.embed` end to end: generated files at 44.1 kHz stereo, 8 kHz and 16 kHz plus a corrupt
one, two captions; embeddings checked against the model applied to independently resampled waveforms. Long
files: windowed (checked against the windows embedded separately), with a 10-minute file in a subprocess whose
peak memory is bounded (slow)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import soxr

from clsp_jax import embed as cli
from clsp_jax.cli import load_model
from clsp_jax.inference import audio_windows
from eval_fixtures import REPO

TEXTS = ["A male speaker with a low-pitched voice.", "A female speaker talks quickly in a happy tone."]


def _signal(seconds: float, rate: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * (150 + 50 * seed) * t * (1 + 0.3 * t))
    return (tone + 0.05 * rng.normal(size=t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
    """[(path, the 16 kHz mono waveform the CLI should embed)], in CLI order, the corrupt file second (None)."""
    root = tmp_path_factory.mktemp("audio")
    files = []
    # 44.1 kHz stereo: the channels differ a lot, their mean is `mid`.
    mid = soxr.resample(_signal(1.3, 16000, 0), 16000, 44100)
    side = 0.2 * np.random.default_rng(9).normal(size=mid.size).astype(np.float32)
    sf.write(root / "stereo44k.wav", np.stack([mid + side, mid - side], axis=1), 44100, subtype="FLOAT")
    files.append((root / "stereo44k.wav", soxr.resample(mid, 44100, 16000)))
    (root / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt this is not audio")
    files.append((root / "broken.wav", None))
    sf.write(root / "mono8k.wav", _signal(1.0, 8000, 1), 8000, subtype="PCM_16")
    files.append((root / "mono8k.wav", soxr.resample(sf.read(root / "mono8k.wav", dtype="float32")[0], 8000, 16000)))
    sf.write(root / "mono16k.flac", _signal(0.7, 16000, 2), 16000)
    files.append((root / "mono16k.flac", sf.read(root / "mono16k.flac", dtype="float32")[0]))
    return files


def test_embed_files_and_texts(run, checkpoint, audio_files, tmp_path):
    _, model = checkpoint
    out = tmp_path / "emb"
    rc, stdout, err = run("--audio", *(p for p, _ in audio_files), "--text", *TEXTS, "--out", out,
                          "--batch-size", 4)
    assert rc == 0, err
    good = [(p, w) for p, w in audio_files if w is not None]
    assert (out / "audio_files.txt").read_text().splitlines() == [str(p) for p, _ in good]
    assert (out / "texts.txt").read_text().splitlines() == TEXTS
    audio_emb, text_emb = np.load(out / "audio_embeddings.npy"), np.load(out / "text_embeddings.npy")
    expected_audio = model.embed_audio([w for _, w in good])
    expected_text = model.embed_text(TEXTS)
    assert audio_emb.shape == (3, 32) and text_emb.shape == (2, 32) and audio_emb.dtype == np.float32
    assert np.abs(audio_emb - expected_audio).max() <= 1e-5
    assert np.abs(text_emb - expected_text).max() <= 1e-5
    sim = np.load(out / "similarity.npy")
    np.testing.assert_allclose(sim, expected_audio @ expected_text.T, atol=1e-5)
    # Channels are averaged: channel 0 alone gives a clearly different embedding.
    left = soxr.resample(sf.read(audio_files[0][0], dtype="float32")[0][:, 0], 44100, 16000)
    assert np.abs(model.embed_audio([left])[0] - audio_emb[0]).max() > 1e-3

    assert "skipped 1 of 4 audio files (decode_error 1)" in err
    failed = (out / "failed_audio.txt").read_text().splitlines()
    assert len(failed) == 1 and failed[0].startswith(f"{audio_files[1][0]}\tdecode_error")
    assert "audio files: 4/4" in err and "captions: 2/2" in err
    row = next(line for line in stdout.splitlines() if line.startswith("mono8k.wav"))
    assert row.split()[1:] == [f"{v:.3f}" for v in sim[1]] + [f"t{int(np.argmax(sim[1]))}"]
    assert f"t1: {TEXTS[1]}" in stdout and "embedded 3 audio file(s) and 2 caption(s)" in stdout


def test_lists_and_torch_checkpoint(run, checkpoint, audio_files, tmp_path):
    path, model = checkpoint
    root = audio_files[0][0].parent
    listing = tmp_path / "files.txt"
    listing.write_text(f"# clips\n{audio_files[0][0]}\n\n{root.name}/missing.wav\n"
                       f"{root.name}/{audio_files[2][0].name}\n")
    (tmp_path / root.name).symlink_to(root)  # relative entries resolve against the list's folder
    captions = tmp_path / "captions.txt"
    captions.write_text(f"{TEXTS[0]}\n\n{TEXTS[1]}\n")
    out = tmp_path / "emb"
    rc, _, err = run("--audio-list", listing, "--text-file", captions, "--out", out, "--batch-size", 4)
    assert rc == 0, err
    assert (out / "audio_files.txt").read_text().splitlines() == [
        str(audio_files[0][0]), str(tmp_path / root.name / audio_files[2][0].name)]
    assert "skipped 1 of 3 audio files (missing_audio 1)" in err
    expected = model.embed_audio([audio_files[0][1], audio_files[2][1], audio_files[3][1]])[:2]
    assert np.abs(np.load(out / "audio_embeddings.npy") - expected).max() <= 1e-5
    assert (out / "texts.txt").read_text().splitlines() == TEXTS

    # A .safetensors checkpoint with config.json and tokenizer.json beside it loads the same network.
    from safetensors.numpy import save_file

    torch_dir = tmp_path / "torch"
    torch_dir.mkdir()
    save_file(model.torch_state_dict(), str(torch_dir / "clsp.safetensors"))
    (torch_dir / "config.json").write_text(json.dumps(model.config))
    (torch_dir / "tokenizer.json").write_bytes((path / "tokenizer.json").read_bytes())
    loaded = load_model(str(torch_dir / "clsp.safetensors"))
    assert loaded.tokenizer is not None
    ours, theirs = loaded.torch_state_dict(), model.torch_state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


def test_errors(run, audio_files, tmp_path):
    broken = audio_files[1][0]
    (tmp_path / "a_file").write_text("x")
    cases = [
        (["--audio", broken, tmp_path / "nope.wav", "--out", tmp_path / "o"],
         "none of the 2 audio files could be embedded"),
        (["--out", tmp_path / "o"], "nothing to embed"),
        (["--text", "two\nlines", "--out", tmp_path / "o"], "must be single lines"),
        (["--text", "x", "--out", tmp_path / "a_file"], "is a file"),
        (["--audio-list", tmp_path / "none.txt", "--out", tmp_path / "o"], "none.txt does not exist"),
        (["--audio", broken, "--audio-list", tmp_path / "none.txt", "--out", tmp_path / "o"], "not allowed with"),
    ]
    for argv, message in cases:
        rc, out, err = run(*argv)
        assert rc == 2, (argv, out, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("clsp_jax.embed: error: ") and message in last, (message, err)
    assert not (tmp_path / "o").exists()
    assert cli.main(["--checkpoint", str(tmp_path), "--text", "x", "--out", str(tmp_path / "o")]) == 2


@pytest.mark.parametrize("num_samples,max_samples", [(10, 10), (11, 10), (30, 10), (31, 10), (1, 10), (479_999, 48_000)])
def test_audio_windows_are_the_fewest_equal_windows_that_fit(num_samples, max_samples):
    windows = audio_windows(num_samples, max_samples)
    lengths = [stop - start for start, stop in windows]
    assert windows[0][0] == 0 and windows[-1][1] == num_samples
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))  # consecutive, no overlap
    assert max(lengths) <= max_samples and max(lengths) - min(lengths) <= 1
    assert len(windows) == -(-num_samples // max_samples)  # fewer windows could not hold num_samples


def test_long_file_is_the_mean_of_its_windows_and_empty_captions_are_refused(run, checkpoint, audio_files, tmp_path):
    """A 5 s file with --max-audio-seconds 2: three windows of 5/3 s, embedded in the same passes as the short
    files (the 2 s bucket of test_embed_files_and_texts, so nothing new compiles)."""
    _, model = checkpoint
    long_wave = _signal(5.0, 16000, 3)
    sf.write(tmp_path / "long.wav", long_wave, 16000, subtype="FLOAT")
    good = [(p, w) for p, w in audio_files if w is not None]
    out = tmp_path / "emb"
    rc, _, err = run("--audio", *(p for p, _ in good), tmp_path / "long.wav", "--text", "", TEXTS[0], " ", TEXTS[1],
                     "--out", out, "--batch-size", 4, "--max-audio-seconds", 2)
    assert rc == 0, err
    assert (out / "audio_files.txt").read_text().splitlines() == [str(p) for p, _ in good] + [str(tmp_path / "long.wav")]
    assert (out / "texts.txt").read_text().splitlines() == TEXTS
    assert "clsp_jax.embed: --text captions 1, 3 are empty: refused" in err
    assert "1 audio file(s) longer than 2 s embedded as the mean of windows of at most 2 s" in err
    emb = np.load(out / "audio_embeddings.npy")
    assert np.abs(emb[:3] - model.embed_audio([w for _, w in good])).max() <= 1e-5
    n = len(long_wave)
    windows = model.embed_audio([long_wave[n * k // 3:n * (k + 1) // 3] for k in range(3)])
    assert np.abs(windows[0] - windows[2]).max() > 1e-2  # the windows differ: a mean is not any one of them
    mean = windows.mean(axis=0)
    np.testing.assert_allclose(emb[3], mean / np.linalg.norm(mean), atol=1e-5)


def test_api_refuses_empty_captions_and_bad_window_lengths(checkpoint):
    _, model = checkpoint
    with pytest.raises(ValueError, match=re.escape("captions [1] are empty")):
        model.embed_text(["A male speaker.", " \t"])
    with pytest.raises(ValueError, match="max_seconds must be a number of seconds >= 1, got 0.5"):
        model.embed_audio(np.zeros((1, 4000), np.float32), max_seconds=0.5)


# Peak resident memory allowed to the 10-minute embed below: the tiny network, its compiled programs and the
# file. Embedded in one piece, the same file asked for hundreds of GB.
MAX_RSS_GIB = 3.0
PEAK_RSS = """import resource, runpy, sys
try:
    runpy.run_module("clsp_jax.embed", run_name="__main__")
finally:
    print("peak_rss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


@pytest.mark.slow  # a minute on two cores: 600 s of audio through the tiny network
def test_ten_minute_file_through_the_module_on_the_cpu(checkpoint, audio_files, tmp_path):
    """The 10-minute file is 20 copies of one 30 s segment, so each of its 30 s windows is that segment and its
    embedding is the segment's; a short file and a corrupt one in the same call still come out right."""
    path, model = checkpoint
    segment = _signal(30.0, 16000, 4)
    sf.write(tmp_path / "ten_minutes.wav", np.tile(segment, 20), 16000, subtype="FLOAT")
    short, broken = audio_files[3], audio_files[1]
    out = tmp_path / "emb"
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, "--checkpoint", str(path), "--audio", str(short[0]),
                           str(tmp_path / "ten_minutes.wav"), str(broken[0]), "--text", TEXTS[0], "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert (out / "audio_files.txt").read_text().splitlines() == [str(short[0]), str(tmp_path / "ten_minutes.wav")]
    assert "1 audio file(s) longer than 30 s embedded as the mean of windows of at most 30 s" in proc.stderr
    emb = np.load(out / "audio_embeddings.npy")
    np.testing.assert_allclose(emb[0], model.embed_audio([short[1]])[0], atol=1e-5)
    np.testing.assert_allclose(emb[1], model.embed_audio([segment])[0], atol=1e-5)
    peak_gib = int(re.search(r"peak_rss_kib (\d+)", proc.stderr).group(1)) / 2**20
    print(f"peak RSS of the 10-minute embed: {peak_gib:.2f} GiB")
    assert peak_gib < MAX_RSS_GIB
