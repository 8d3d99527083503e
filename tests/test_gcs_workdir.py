"""`python -m clsp_jax.train --workdir gs://...` end to end against the local GCS emulator (tests/gcs_emulator.py):
a run writes its config, metrics.jsonl, TensorBoard events and Orbax checkpoints to the bucket, resumes from
there without repeating metrics rows, and the export and eval CLIs read it. The runs read their data from a
gs:// copy of a prepared data dir too (training batches, and the eval CLI's retrieval split), so one set of
trainer starts (each a network build and a compile, most of this file's time) covers both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
from etils import epath
from gcs_emulator import event_steps
from train_fixtures import MINILM, ROOT, RUN_TIMEOUT_S, micro_args, micro_data

from clsp_jax import storage
from clsp_jax.data import fcaps_format
from clsp_jax.train import checkpoint

CACHE_FLAG = "--config.train.compilation_cache_dir="


def _cli(gcs, *args: str) -> subprocess.CompletedProcess:
    """`python <args>` from the repository root, pointed at the emulator."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, **gcs.env}, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)


def _train(gcs, workdir: str, data_dir: str, cache_dir, num_steps: int) -> subprocess.CompletedProcess:
    """A micro run of `num_steps` steps with a checkpoint every 2 (and none by time).

    The learning-rate schedule is fixed at 6 steps (not `num_steps`), so the resumed run compiles the same step
    and finds it in the XLA cache; the cache stays local (micro_args would put it beside the work dir, in the
    bucket). No data-initialised audio head: it reads the same gs:// records as the training batches."""
    args = [f"{CACHE_FLAG}{cache_dir}" if a.startswith(CACHE_FLAG) else a
            for a in micro_args(workdir, data_dir, f"--config.train.num_steps={num_steps}",
                                "--config.optim.total_steps=6", "--config.train.checkpoint_every_steps=2",
                                "--config.train.checkpoint_every_minutes=0.0",
                                "--config.train.audio_head_init_batches=0")]
    proc = _cli(gcs, *args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _snapshot(workdir: str) -> dict:
    """What a run left in its work dir: file names (Orbax's array chunks left out), metrics rows, the
    TensorBoard loss steps of each events file (by name), the committed checkpoint steps."""
    run = epath.Path(workdir)
    names = sorted(os.fspath(p)[len(workdir) + 1:] for p in _files(run))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    events = {p.name: event_steps(p.read_bytes(), tag="loss") for p in (run / "tensorboard").iterdir()}
    manager = checkpoint.make_manager(workdir, read_only=True)
    steps = list(manager.all_steps())
    manager.close()
    return {"names": names, "rows": rows, "events": events, "steps": steps}


def _files(folder: epath.Path):
    for p in folder.iterdir():
        if p.is_dir():
            if p.name != "d":  # ocdbt.process_0/d/<hash>: array chunks
                yield from _files(p)
        else:
            yield p


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> str:
    return micro_data(tmp_path_factory.mktemp("micro"), clips=16)


@pytest.fixture(scope="module")
def remote_data(gcs, local_data) -> str:
    """The prepared data dir, copied into the bucket as a user would (prepare locally, then copy)."""
    url = gcs.path(f"data-{uuid.uuid4().hex[:8]}")
    storage.upload_tree(local_data, url)
    return url


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("xla_cache")


@pytest.fixture(scope="module")
def first_run(gcs, remote_data, cache_dir) -> tuple[str, dict]:
    """(work dir URL, its snapshot) after 4 steps, checkpoints at 2 and 4."""
    workdir = gcs.path(f"workdir-{uuid.uuid4().hex[:8]}", "run")
    _train(gcs, workdir, remote_data, cache_dir, num_steps=4)
    return workdir, _snapshot(workdir)


@pytest.fixture(scope="module")
def resumed_run(gcs, remote_data, cache_dir, first_run) -> tuple[str, dict, str]:
    """(work dir URL, its snapshot, the run's stderr) after resuming `first_run` to 6 steps."""
    workdir, _ = first_run
    proc = _train(gcs, workdir, remote_data, cache_dir, num_steps=6)
    return workdir, _snapshot(workdir), proc.stderr


def test_a_gs_workdir_holds_the_whole_run(first_run):
    workdir, snap = first_run
    run = epath.Path(workdir)
    assert {"config.json", "tokenizer.json", "metrics.jsonl"} <= set(snap["names"])
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["num_steps"] == 4 and config["data"]["data_dir"].startswith("gs://")
    assert (run / "tokenizer.json").read_bytes() == epath.Path(MINILM).read_bytes()
    # metrics.jsonl is staged locally and uploaded whole: every step's row, once.
    assert [r["step"] for r in snap["rows"]] == [1, 2, 3, 4] and all("loss" in r for r in snap["rows"])
    (events,) = snap["events"].values()
    assert events == [1, 2, 3, 4]
    # Orbax: both checkpoints committed (state and data items), no temporary folders left.
    assert snap["steps"] == [2, 4]
    for step in ("2", "4"):
        for item in ("", "state/", "data/"):
            assert f"checkpoints/{step}/{item}commit_success.txt" in snap["names"]
    assert not [n for n in snap["names"] if "tmp" in n]


def test_a_gs_workdir_resumes_without_repeating_metrics(first_run, resumed_run):
    _, first = first_run
    _, snap, stderr = resumed_run
    assert "resumed from gs://" in stderr and "at step 4" in stderr
    assert [r["step"] for r in snap["rows"]] == [1, 2, 3, 4, 5, 6]
    assert snap["rows"][:4] == first["rows"]  # the first run's rows kept as they were
    # One events file per run: the first one's steps as before, the resumed run's 5 and 6 in a new file.
    assert sorted(snap["events"].values()) == [[1, 2, 3, 4], [5, 6]]
    assert snap["steps"] == [2, 4, 6]


def test_export_and_eval_read_a_gs_run(gcs, resumed_run, local_data, remote_data, tmp_path):
    workdir, _, _ = resumed_run
    out = tmp_path / "export"
    proc = _cli(gcs, "-m", "clsp_jax.export", "--workdir", workdir, "--out", str(out), "--format", "orbax")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"exported step 6 (weights) of {workdir}" in proc.stdout
    assert (out / "config.json").is_file() and (out / "params").is_dir()
    assert (out / "tokenizer.json").read_bytes() == epath.Path(MINILM).read_bytes()

    results = epath.Path(gcs.path(f"eval-{uuid.uuid4().hex[:8]}"))
    proc = _cli(gcs, "-m", "clsp_jax.eval", "--checkpoint", str(out), "--task", "retrieval",
                "--data-dir", remote_data, "--split", "train", "--out", os.fspath(results), "--batch-size", "8")
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((results / "results.json").read_text())
    clips = len(fcaps_format.load_num_samples(local_data, "train"))
    assert report["num_clips"] == clips and report["metrics"]["global/num_clips"] == clips
    assert 0.0 <= report["metrics"]["global/s2t/R@1"] <= 1.0
    assert (results / "results.md").read_text() in proc.stdout


def test_export_refuses_a_gs_out(first_run, gcs, capsys):
    from clsp_jax import export

    workdir, _ = first_run
    assert export.main(["--workdir", workdir, "--out", gcs.path("exported"), "--format", "orbax"]) == 2
    assert "write the export to a local path" in capsys.readouterr().err
