"""Every user error of `python -m clsp_jax.embed`, `python -m clsp_jax.eval` and `python -m data_prep.prepare`
ends as one line "<prog>: error: <what and where>" on stderr, exit code 2, no traceback: a table of bad inputs
per CLI, run in process (the jax import is paid once); the module entry point of prepare in a subprocess.
Also: the preparation report counts the clips dropped for their duration, with the bounds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

import fcaps_fixtures as ff
from clsp_jax import embed, eval as eval_cli
from data_prep import prepare
from eval_fixtures import REPO, cli_runner


@pytest.fixture(scope="module")
def bad(tmp_path_factory, checkpoint):
    """A folder of bad inputs: audio files that cannot be embedded, non-UTF-8 text, broken manifests, a file
    where a folder belongs, broken checkpoints (a torn copy of the saved tiny CLSP, one whose config is `{}`,
    an empty work dir)."""
    root = tmp_path_factory.mktemp("bad")
    sf.write(root / "short.wav", np.zeros(100, np.float32), 16000)  # < 80 ms
    (root / "empty.wav").write_bytes(b"")
    (root / "notes.wav").write_text("these are notes, not audio\n")
    (root / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt this is not audio")
    (root / "latin1.txt").write_bytes(b"caf\xe9 au lait\n")
    (root / "a_file").write_text("x")
    (root / "cuts.jsonl.gz").write_bytes(b"\x1f\x8b not gzip")
    (root / "empty.jsonl").write_text("")
    (root / "empty_dir").mkdir()
    path, _ = checkpoint
    torn = root / "torn_ckpt"
    shutil.copytree(path, torn)
    biggest = max((f for f in (torn / "params").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    (root / "no_model_ckpt").mkdir()
    (root / "no_model_ckpt" / "config.json").write_text("{}")
    return root


def assert_one_line_error(rc, out, err, prog, message, code=2):
    assert "Traceback" not in out + err, err
    last = err.strip().splitlines()[-1]
    assert rc == code and last.startswith(f"{prog}: error: ") and message in last, (rc, message, err)


# (argv after `--checkpoint <the saved tiny CLSP>` with {bad} standing for the folder of bad inputs; the line's
# expected part). A later --checkpoint replaces the first (argparse keeps the last).
EMBED_CASES = [
    (["--audio", "{bad}/nope.wav", "--out", "{bad}/o"],
     "none of the 1 audio files could be embedded; first failure: ('{bad}/nope.wav', 'missing_audio"),
    (["--audio", "{bad}/short.wav", "{bad}/empty.wav", "{bad}/notes.wav", "{bad}/corrupt.wav", "--out", "{bad}/o"],
     "none of the 4 audio files could be embedded; first failure: ('{bad}/short.wav', 'too_short: 100 samples"),
    (["--text", "", "--out", "{bad}/o"], "nothing to embed: --text caption 1 is empty: refused"),
    (["--text", " ", "\t", "--out", "{bad}/o"], "nothing to embed: --text captions 1, 2 are empty: refused"),
    (["--text-file", "{bad}/latin1.txt", "--out", "{bad}/o"], "--text-file {bad}/latin1.txt is not UTF-8 text"),
    (["--audio-list", "{bad}/nope.txt", "--out", "{bad}/o"], "--audio-list {bad}/nope.txt does not exist"),
    (["--text", "x", "--out", "{bad}/a_file/o"], "--out {bad}/a_file/o: {bad}/a_file is a file"),
    (["--text", "x", "--out", "{bad}/o", "--batch-size", "many"], "argument --batch-size: invalid int value: 'many'"),
    (["--text", "x", "--out", "{bad}/o", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--text", "x", "--out", "{bad}/o", "--max-audio-seconds", "0"],
     "--max-audio-seconds must be a number of seconds >= 1, got 0.0"),
    (["--text", "x", "--out", "{bad}/o", "--max-audio-seconds", "inf"],
     "--max-audio-seconds must be a number of seconds >= 1, got inf"),
    (["--text", "x", "--out", "{bad}/o", "--colour"], "unrecognized arguments: --colour"),
    (["--checkpoint", "{bad}/empty_dir", "--text", "x", "--out", "{bad}/o"],
     "--checkpoint {bad}/empty_dir is neither a saved CLSP folder (no config.json) nor a .safetensors file"),
    (["--checkpoint", "{bad}/torn_ckpt", "--text", "x", "--out", "{bad}/o"],
     "--checkpoint {bad}/torn_ckpt could not be loaded: ValueError: OUT_OF_RANGE: Error reading "),
    (["--checkpoint", "{bad}/no_model_ckpt", "--text", "x", "--out", "{bad}/o"],
     "--checkpoint {bad}/no_model_ckpt could not be loaded: ValueError: model config needs a 'speech' dict"),
    (["--checkpoint", "{bad}/nope.safetensors", "--text", "x", "--out", "{bad}/o"],
     "--checkpoint {bad}/nope.safetensors does not exist"),
]

EVAL_CASES = [
    (["--task", "retrieval", "--manifest", "{bad}/nope.jsonl.gz"], "--manifest {bad}/nope.jsonl.gz does not exist"),
    (["--task", "retrieval", "--manifest", "{bad}/cuts.jsonl.gz"],
     "--manifest {bad}/cuts.jsonl.gz has no usable cut (manifest_unreadable 1)"),
    (["--task", "retrieval", "--manifest", "{bad}/empty.jsonl"], "--manifest {bad}/empty.jsonl has no usable cut"),
    (["--task", "retrieval", "--data-dir", "{bad}/nope", "--split", "test"], "--data-dir {bad}/nope does not exist"),
    (["--task", "retrieval", "--data-dir", "{bad}/empty_dir", "--split", "test"],
     "fcaps-test.num_samples.npy is missing: prepare the split with data_prep.prepare"),
    (["--task", "similarity", "--ratings", "{bad}/latin1.txt"], "--ratings {bad}/latin1.txt is not UTF-8 text"),
    (["--task", "similarity", "--ratings", "{bad}/empty.jsonl"], "columns must be audio,caption,score"),
    (["--task", "similarity", "--ratings", "{bad}/empty.jsonl", "--out", "{bad}/a_file"], "--out {bad}/a_file is a file"),
    (["--task", "similarity", "--ratings", "{bad}/empty.jsonl", "--max-audio-seconds", "nan"],
     "--max-audio-seconds must be a number of seconds >= 1, got nan"),
    (["--task", "similarity", "--ratings", "{bad}/empty.jsonl", "--batch-size", "1.5"],
     "argument --batch-size: invalid int value: '1.5'"),
    (["--checkpoint", "{bad}/empty_dir", "--task", "similarity", "--ratings", "{bad}/empty.jsonl"],
     "--checkpoint {bad}/empty_dir is not a saved CLSP (no config.json)"),
    (["--checkpoint", "{bad}/torn_ckpt", "--task", "similarity", "--ratings", "{bad}/empty.jsonl"],
     "--checkpoint {bad}/torn_ckpt could not be loaded: ValueError: OUT_OF_RANGE: Error reading "),
]


def _fill(items, bad):
    return [str(x).replace("{bad}", str(bad)) for x in items]


@pytest.mark.parametrize("argv,message", EMBED_CASES, ids=[m[:40] for _, m in EMBED_CASES])
def test_embed(argv, message, bad, checkpoint, monkeypatch, capsys):
    rc, out, err = cli_runner(embed.main, checkpoint, monkeypatch, capsys)(*_fill(argv, bad))
    assert_one_line_error(rc, out, err, "clsp_jax.embed", _fill([message], bad)[0])
    assert not (bad / "o").exists()


@pytest.mark.parametrize("argv,message", EVAL_CASES, ids=[m[:40] for _, m in EVAL_CASES])
def test_eval(argv, message, bad, checkpoint, monkeypatch, capsys):
    argv = _fill([*argv, "--out", "{bad}/eo"] if "--out" not in argv else argv, bad)
    rc, out, err = cli_runner(eval_cli.main, checkpoint, monkeypatch, capsys)(*argv)
    assert_one_line_error(rc, out, err, "clsp_jax.eval", _fill([message], bad)[0])
    assert not (bad / "eo").exists()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(manifest, audio root) of four clips: 1.5 s, 2.5 s, 3.5 s and 5 s."""
    root = tmp_path_factory.mktemp("corpus")
    records = []
    for i, seconds in enumerate((1.5, 2.5, 3.5, 5.0)):
        ff.write_audio(root / "audio" / f"c{i}.wav", ff.tone(seconds, seed=i))
        records.append(ff.cut(f"clip{i}", f"c{i}.wav", seconds, index=i))
    return ff.write_manifest(root / "cuts.jsonl", records), root / "audio"


PREPARE_CASES = [
    (["--manifest", "{bad}/nope.jsonl"], "manifest {bad}/nope.jsonl does not exist"),
    (["--audio-root", "{bad}/nope"], "--audio-root {bad}/nope is not a directory"),
    (["--data-dir", "{bad}/a_file"], "--data-dir {bad}/a_file is a file"),
    (["--min-duration", "5", "--max-duration", "3"], "need 0 <= --min-duration <= --max-duration (finite), got 5.0 and 3.0"),
    (["--max-duration", "inf"], "need 0 <= --min-duration <= --max-duration (finite)"),
    (["--min-caption-chars", "900"], "caption lengths must be >= 0 with --min-caption-chars <= --max-caption-chars"),
    (["--split", "train/x"], "split 'train/x' must match"),
    (["--workers", "0"], "--clips-per-shard and --workers must be >= 1"),
    (["--workers", "two"], "argument --workers: invalid int value: 'two'"),
    (["--beam", "--runner", "x"], "unrecognized arguments: --runner x"),
]


def _prepare_argv(corpus, data_dir, *overrides):
    manifest, audio_root = corpus
    return ["--manifest", str(manifest), "--split", "train", "--audio-root", str(audio_root),
            "--data-dir", str(data_dir), *overrides]  # an override replaces the default before it


@pytest.mark.parametrize("argv,message", PREPARE_CASES, ids=[m[:40] for _, m in PREPARE_CASES])
def test_prepare(argv, message, bad, corpus, tmp_path, capsys):
    rc = prepare.main(_prepare_argv(corpus, tmp_path / "tfds", *_fill(argv, bad)))
    out, err = capsys.readouterr()
    assert_one_line_error(rc, out, err, "data_prep.prepare", _fill([message], bad)[0])
    assert not (tmp_path / "tfds").exists()


def test_prepare_reports_the_clips_dropped_for_their_duration(corpus, tmp_path, capsys):
    argv = _prepare_argv(corpus, tmp_path / "tfds", "--max-duration", "4")
    assert prepare.main(argv) == 0
    out = capsys.readouterr().out
    assert "fcaps/train: accepted 2 clips" in out and "rejected 2 clips" in out
    assert "  too_long: 1 (longer than --max-duration 4 s)\n" in out
    assert "  too_short: 1 (shorter than --min-duration 2 s)\n" in out
    summary = json.loads((tmp_path / "tfds/fcaps/1.0.0/reports/train/summary.json").read_text())
    assert summary["rejected_by_reason"] == {"too_long": 1, "too_short": 1} and summary["duration_range_s"] == [2.0, 4.0]
    # The same split again: refused in one line, the built split kept.
    rc = prepare.main(argv)
    out, err = capsys.readouterr()
    assert_one_line_error(rc, out, err, "data_prep.prepare", "split 'train' already exists in ")
    assert summary == json.loads((tmp_path / "tfds/fcaps/1.0.0/reports/train/summary.json").read_text())


def test_prepare_module_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "data_prep.prepare", "--manifest", str(tmp_path / "nope.jsonl"),
                           "--split", "train", "--audio-root", str(tmp_path), "--data-dir", str(tmp_path / "tfds")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"data_prep.prepare: error: manifest {tmp_path / 'nope.jsonl'} does not exist"]
