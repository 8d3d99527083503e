"""Faults a long run meets, on the micro trainer (`python -m clsp_jax.train`): checkpoints torn, half-written,
uncommitted or with files gone; a config changed under the work dir; a data dir without its split; a lower
num_steps; a full disk during saves; and the time-based save policy at the start of a run.

One micro run (6 steps, checkpoints at 2, 4, 6, model averaging every 2 steps) is trained once per module;
each test damages a copy of it (`shutil.copytree`) beside the original, so every run shares its persistent
XLA cache.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from train_fixtures import ROOT, RUN_TIMEOUT_S, micro_command, micro_data

STEPS = ["--config.train.num_steps=6", "--config.train.audio_head_init_batches=0",
         "--config.train.checkpoint_every_steps=2", "--config.train.checkpoint_every_minutes=0",
         "--config.optim.average_period=2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def data_dir(base):
    return micro_data(base / "micro")


@pytest.fixture(scope="module")
def trained(base, data_dir):
    """The work dir of an uninterrupted 6-step run (checkpoints 2, 4, 6; keep 3; a running average of the
    weights at steps 2, 4, 6)."""
    result = _run(base / "trained", data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _steps(base / "trained") == ["2", "4", "6"]
    return base / "trained"


def _run(workdir, data_dir, *extra, timeout=RUN_TIMEOUT_S):
    extra_keys = {e.split("=", 1)[0] for e in extra}
    args = [*extra, *(s for s in STEPS if s.split("=", 1)[0] not in extra_keys)]
    return subprocess.run(micro_command(workdir, data_dir, *args), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _copy(trained, name):
    """A copy of the trained work dir beside it (same parent: the same XLA cache)."""
    target = trained.parent / name
    shutil.copytree(trained, target)
    return target


def _steps(workdir):
    return sorted(os.listdir(workdir / "checkpoints"), key=lambda n: (int(n.split(".")[0]), n))


def _losses(workdir):
    with open(workdir / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _lines(stderr, text):
    """The stderr lines that contain `text` (one expected per fault)."""
    return [line for line in stderr.splitlines() if text in line]


def _assert_clean(result):
    assert "Traceback" not in result.stderr, result.stderr[-4000:]


def test_torn_array_file_resumes_from_the_older_checkpoint_and_reproduces_the_run(trained, data_dir, capsys):
    """The newest checkpoint's two largest array files (the word embeddings of the weights and of their running
    average) cut in half. Export names it in one line (exit 2) and leaves the run as it is. The run reports the
    read error in one line, moves the folder aside, resumes from step 4 and repeats the uninterrupted run's
    losses, weights and running average."""
    from clsp_jax import export

    run = _copy(trained, "torn")
    chunks = run / "checkpoints" / "6" / "state" / "ocdbt.process_0" / "d"
    for largest in sorted(chunks.iterdir(), key=lambda p: p.stat().st_size)[-2:]:
        os.truncate(largest, largest.stat().st_size // 2)
    assert export.main(["--workdir", str(run), "--out", str(run.parent / "torn_export"), "--format", "orbax"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the checkpoint at step 6 does not restore (ValueError: OUT_OF_RANGE" in err
    assert "older usable steps: [2, 4]" in err and _steps(run) == ["2", "4", "6"]
    result = _run(run, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_clean(result)
    (line,) = _lines(result.stderr, "is unreadable")
    assert "checkpoints/6 is unreadable" in line and "OUT_OF_RANGE" in line and "moved aside to 6.corrupt-1" in line
    assert _lines(result.stderr, "resumed from") and "at step 4" in _lines(result.stderr, "resumed from")[0]
    assert _steps(run) == ["2", "4", "6", "6.corrupt-1"]
    reference, resumed = _losses(trained), _losses(run)
    assert sorted(resumed) == sorted(reference) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([resumed[s] for s in (5, 6)], [reference[s] for s in (5, 6)], rtol=1e-6, atol=1e-6)
    import jax

    from clsp_jax.train.checkpoint import restore_params

    (a, _, step_a), (b, _, step_b) = restore_params(str(trained)), restore_params(str(run))
    assert step_a == step_b == 6
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    # The running average too: restored at step 4 with the state, it folds step 6 in as the uninterrupted run.
    (a, _, step_a), (b, _, step_b) = (restore_params(str(w), averaged=True) for w in (trained, run))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_running_average_is_the_mean_of_the_checkpointed_weights(trained):
    """Averaging every 2 steps, checkpoints at 2, 4, 6: the snapshots are the checkpointed raw weights, so the
    running average saved at step 6 (the jitted step's update, through Orbax) is the float64 mean of the raw
    weights saved at 2, 4 and 6."""
    import jax

    from clsp_jax.train.checkpoint import restore_average, restore_params

    raw = [restore_params(str(trained), step)[0] for step in (2, 4, 6)]
    average, count, _, _ = restore_average(str(trained), 6)
    assert count == 3
    expected = jax.tree.map(lambda *xs: np.mean(np.stack(xs).astype(np.float64), axis=0), *raw)
    for x, y in zip(jax.tree.leaves(average), jax.tree.leaves(expected)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)
    # Training moved the weights between the snapshots: the average is not the last of them.
    assert any(not np.allclose(x, y, rtol=1e-6, atol=1e-9)
               for x, y in zip(jax.tree.leaves(average), jax.tree.leaves(raw[-1])))


def test_missing_metadata_or_item_is_moved_aside(trained, data_dir):
    """Step 6 without state/_METADATA and step 2 without its data item: both moved aside at start (one line
    each), the run resumes from step 4 (here num_steps=4: nothing left to train, exit 0)."""
    run = _copy(trained, "missing")
    (run / "checkpoints" / "6" / "state" / "_METADATA").unlink()
    shutil.rmtree(run / "checkpoints" / "2" / "data")
    result = _run(run, data_dir, "--config.train.num_steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_clean(result)
    assert len(_lines(result.stderr, "moved aside")) == 2
    assert _lines(result.stderr, "checkpoints/6 is incomplete (no state/_METADATA)")
    assert _lines(result.stderr, "checkpoints/2 is incomplete (no data, data/metadata)")
    assert _lines(result.stderr, "at step 4 = train.num_steps: nothing to train")
    assert _steps(run) == ["2.corrupt-1", "4", "6.corrupt-1"]


def test_uncommitted_step_above_good_ones_is_never_the_latest(trained, data_dir, capsys):
    """A step 10 without commit_success.txt and an Orbax temporary folder of step 8: export ignores both and
    refuses `--step 10` in one line; the run sets 10 aside, removes the temporary folder, resumes from 6, and
    its retention keeps the good checkpoints 4 and 6 beside its new 8."""
    from clsp_jax import export

    run = _copy(trained, "uncommitted")
    shutil.copytree(run / "checkpoints" / "6", run / "checkpoints" / "10")
    (run / "checkpoints" / "10" / "commit_success.txt").unlink()
    shutil.copytree(run / "checkpoints" / "6", run / "checkpoints" / "8.orbax-checkpoint-tmp-1234")
    out = run.parent / "uncommitted_export"
    assert export.main(["--workdir", str(run), "--out", str(out), "--format", "orbax"]) == 0
    assert "exported step 6 " in capsys.readouterr().out
    assert export.main(["--workdir", str(run), "--out", str(out), "--format", "orbax", "--step", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "step 10 is uncommitted (no commit_success.txt" in err, err

    result = _run(run, data_dir, "--config.train.num_steps=8")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_clean(result)
    (line,) = _lines(result.stderr, "moved aside")
    assert "checkpoints/10 is uncommitted" in line and "10.corrupt-1" in line
    assert "at step 6" in _lines(result.stderr, "resumed from")[0]
    assert _steps(run) == ["4", "6", "8", "10.corrupt-1"]  # keep 3: step 2 went, 4 and 6 stayed


def test_half_written_step_is_moved_aside(trained, data_dir):
    """A committed-looking step 8 whose state has neither _METADATA nor its OCDBT manifest (a copy cut short):
    moved aside; the run resumes from 6, which is num_steps (exit 0, nothing trained)."""
    run = _copy(trained, "half")
    half = run / "checkpoints" / "8"
    shutil.copytree(run / "checkpoints" / "6", half)
    for name in ("_METADATA", "manifest.ocdbt"):
        (half / "state" / name).unlink()
    result = _run(run, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_clean(result)
    (line,) = _lines(result.stderr, "moved aside")
    assert "checkpoints/8 is incomplete (no state/_METADATA)" in line
    assert _lines(result.stderr, "at step 6 = train.num_steps: nothing to train")
    assert _steps(run) == ["2", "4", "6", "8.corrupt-1"]


def _none_restores(trained, data_dir, name):
    """A copy whose every checkpoint lacks state/_METADATA, after the run that stops on it."""
    run = _copy(trained, name)
    for step in ("2", "4", "6"):
        (run / "checkpoints" / step / "state" / "_METADATA").unlink()
    config = (run / "config.json").read_bytes()
    result = _run(run, data_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    _assert_clean(result)
    (line,) = _lines(result.stderr, "checkpoint error:")
    assert "no checkpoint" in line and "2.corrupt-1, 4.corrupt-1, 6.corrupt-1" in line and "start_fresh" in line
    assert (run / "config.json").read_bytes() == config
    return run


def test_no_checkpoint_restores_stops(trained, data_dir):
    """Every checkpoint without its state/_METADATA: all moved aside, and the run stops (exit 2, one line)
    instead of training from step 0 beside them; a rerun says the same."""
    run = _none_restores(trained, data_dir, "none")
    result = _run(run, data_dir)
    assert result.returncode == 2 and len(_lines(result.stderr, "checkpoint error: no checkpoint")) == 1
    assert _steps(run) == ["2.corrupt-1", "4.corrupt-1", "6.corrupt-1"]


@pytest.mark.slow  # builds and trains a network from step 0; test_no_checkpoint_restores_stops covers the stop
def test_start_fresh_trains_beside_the_set_aside_checkpoints(trained, data_dir):
    run = _none_restores(trained, data_dir, "fresh")
    result = _run(run, data_dir, "--config.train.num_steps=3", "--config.train.start_fresh=True")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _steps(run) == ["2", "2.corrupt-1", "3", "4.corrupt-1", "6.corrupt-1"]
    assert sorted(_losses(run)) == [1, 2, 3]


def test_changed_config_on_resume(trained, data_dir):
    """A fixed key changed (the joint width): one line naming it with both values, exit 2, nothing written.
    Changeable keys (logging): listed in one line and accepted."""
    run = _copy(trained, "changed")
    config = (run / "config.json").read_bytes()
    result = _run(run, data_dir, "--config.model.joint_dim=24")
    assert result.returncode == 2
    _assert_clean(result)
    (line,) = _lines(result.stderr, "config error:")
    assert "model.joint_dim was 16, now 24" in line
    assert (run / "config.json").read_bytes() == config and _steps(run) == ["2", "4", "6"]

    result = _run(run, data_dir, "--config.train.log_every_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = _lines(result.stderr, "config changed on resume")
    assert "train.log_every_steps: 1 -> 2" in line


def test_data_dir_without_prepared_split(tmp_path):
    """A data dir holding no prepared train split: one line, exit 2, and the work dir is not even created."""
    empty = tmp_path / "data"
    empty.mkdir()
    result = _run(tmp_path / "run", empty)
    assert result.returncode == 2
    _assert_clean(result)
    (line,) = _lines(result.stderr, "config error:")
    assert "no prepared fcaps 'train' split" in line and "data_prep.prepare" in line
    assert not (tmp_path / "run").exists()


def test_lower_num_steps_than_the_checkpoint(trained, data_dir):
    """num_steps below the checkpoint's step: exit 2 with one line (the run cannot do what it was asked;
    exit 0 would let a script export step 6 believing it got step 4); the work dir is left as it was."""
    run = _copy(trained, "lower")
    config = (run / "config.json").read_bytes()
    result = _run(run, data_dir, "--config.train.num_steps=4")
    assert result.returncode == 2
    _assert_clean(result)
    (line,) = _lines(result.stderr, "config error:")
    assert "train.num_steps=4 is below the step of the checkpoint" in line and "(6)" in line
    assert (run / "config.json").read_bytes() == config and _steps(run) == ["2", "4", "6"]


def _tmpfs(path, size):
    """Mounts a tmpfs of `size` at `path` (root only); False when it cannot."""
    path.mkdir(exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_saves_fail_cleanly_and_a_rerun_with_space_resumes(trained, data_dir):
    """The work dir on a 14 MiB tmpfs holding checkpoint 6 (9.8 MB): the saves at 8 and 10 run out of space.
    Each failure is one line, its partial folder goes, training goes on; the failed final save ends the run
    with exit 1 and one line; checkpoint 6 is intact. With the tmpfs grown, the same command resumes from 6."""
    run = trained.parent / "full"
    if not _tmpfs(run, "14m"):
        pytest.skip("needs root to mount a size-limited tmpfs")
    try:
        (run / "checkpoints").mkdir()
        for name in ("config.json", "tokenizer.json", "metrics.jsonl"):
            shutil.copy(trained / name, run / name)
        shutil.copytree(trained / "checkpoints" / "6", run / "checkpoints" / "6")
        result = _run(run, data_dir, "--config.train.num_steps=10")
        assert result.returncode == 1, result.stderr[-3000:]
        _assert_clean(result)
        failed = _lines(result.stderr, "the next save retries")
        assert len(failed) == 2 and "step 8" in failed[0] and "step 10" in failed[1], result.stderr[-3000:]
        assert all("RESOURCE_EXHAUSTED" in line and "checkpoints kept: [6]" in line for line in failed)
        assert result.stderr.strip().splitlines()[-1].startswith("the checkpoint at step 10 could not be saved")
        assert _steps(run) == ["6"]  # no partial folder left, nothing lost
        subprocess.run(["mount", "-o", "remount,size=40m", str(run)], check=True)
        result = _run(run, data_dir, "--config.train.num_steps=10")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "at step 6" in _lines(result.stderr, "resumed from")[0]
        assert _steps(run) == ["6", "8", "10"]
    finally:
        subprocess.run(["umount", str(run)], capture_output=True)


def test_time_based_saves_wait_an_interval_from_the_start():
    """IntervalSinceStart: no save at the first steps of a run (Orbax's own policy saves at step 1 when no
    checkpoint exists yet), nor right after resuming from an old checkpoint; one once the interval passed."""
    from orbax.checkpoint import options
    from orbax.checkpoint._src.checkpoint_managers.save_decision_policy import DecisionContext

    from clsp_jax.train.checkpoint import IntervalSinceStart

    start = datetime.datetime.now(tz=datetime.timezone.utc)
    policy = IntervalSinceStart(minimum_interval_secs=60, started=start)
    context = DecisionContext(is_saving_in_progress=False, reached_preemption=False,
                              multiprocessing_options=options.MultiprocessingOptions())
    at = lambda step, seconds: types.SimpleNamespace(step=step, metrics=None,
                                                     time=start + datetime.timedelta(seconds=seconds))
    assert not policy.should_save(at(1, 1), [], context=context)
    assert not policy.should_save(at(1, 1), [at(500, -3600)], context=context)
    assert policy.should_save(at(9, 61), [], context=context)
    assert not policy.should_save(at(12, 100), [at(9, 61)], context=context)
    assert policy.should_save(at(20, 122), [at(9, 61)], context=context)


def test_saver_reports_a_failed_save_and_the_next_one_retries(tmp_path, monkeypatch, caplog):
    """In process, without a size-limited disk: the save of step 2 fails as a full disk makes it fail (an
    OSError after Orbax's temporary folder was begun). One warning line; the partial folder is removed; step 1
    stays; the save of step 3 goes through."""
    import errno

    from clsp_jax.train import checkpoint

    manager = checkpoint.make_manager(str(tmp_path), every_steps=1)
    saver = checkpoint.Saver(manager, str(tmp_path))
    state = {"w": np.arange(8, dtype=np.float32)}
    assert saver.save(1, state, {"next": 1}) and saver.wait()
    real_save = checkpoint.save

    def full_disk(manager, step, *args, **kwargs):
        if step == 2:
            (checkpoint.checkpoint_dir(tmp_path) / "2.orbax-checkpoint-tmp-5").mkdir()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(manager, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save", full_disk)
    with caplog.at_level("WARNING", logger="clsp_jax.train.checkpoint"):
        assert not saver.save(2, state, {"next": 2})
    (record,) = caplog.records
    assert record.getMessage() == ("the checkpoint at step 2 could not be saved (OSError: [Errno 28] No space left "
                                   "on device); checkpoints kept: [1]; the next save retries")
    assert sorted(os.listdir(checkpoint.checkpoint_dir(tmp_path))) == ["1"]
    assert saver.save(3, state, {"next": 3}) and saver.wait()
    manager.close()
    assert sorted(os.listdir(checkpoint.checkpoint_dir(tmp_path))) == ["1", "3"]
    assert saver.failed == [2]


def test_set_aside_on_a_gs_work_dir(gcs_path):
    """On a gs:// work dir (the emulator): a step folder without its commit marker (how an interrupted save
    looks on GCS) and one without state/_METADATA are renamed beside the whole one, objects and all."""
    from clsp_jax.train import checkpoint

    def write_step(step, skip=()):
        for name in ("commit_success.txt", "_CHECKPOINT_METADATA", "state/_METADATA", "state/d/x",
                     "data/metadata"):
            if name not in skip:
                path = gcs_path / "checkpoints" / str(step) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(name)

    write_step(2)
    write_step(4, skip=("state/_METADATA",))
    write_step(6, skip=("commit_success.txt",))
    assert checkpoint.usable_steps(str(gcs_path)) == ([2], {
        4: "incomplete (no state/_METADATA)",
        6: "uncommitted (no commit_success.txt: its save never finished)"})
    checkpoint.set_aside_incomplete(str(gcs_path))
    assert sorted(checkpoint.step_folders(str(gcs_path))) == [2]
    assert checkpoint.set_aside_folders(str(gcs_path)) == ["4.corrupt-1", "6.corrupt-1"]
    assert (gcs_path / "checkpoints" / "6.corrupt-1" / "state" / "d" / "x").read_text() == "state/d/x"


def test_unraisable_reports_of_orbax_coroutines_are_dropped_and_others_kept():
    """After a failed read, Orbax's unawaited coroutines can be collected at any moment and Python prints
    "Exception ignored in: <coroutine ...>" with a whole tensorstore spec: `quiet_reported_errors` drops those
    (the failure is already reported in one line) and keeps every other unraisable report."""
    script = textwrap.dedent("""
        import gc
        from clsp_jax.train import checkpoint
        checkpoint.quiet_reported_errors()
        body = "import asyncio\\nasync def {0}():\\n    try:\\n        await asyncio.sleep(0)\\n    finally:\\n        raise Exception('torn {0}')"
        for name, where in (("orbax_read", "/site-packages/orbax/checkpoint/x.py"), ("ours", "/elsewhere/y.py")):
            scope = {}
            exec(compile(body.format(name), where, "exec"), scope)
            coroutine = scope[name]()
            coroutine.send(None)  # suspended, then collected: its close() raises, an unraisable report
            del coroutine
            gc.collect()
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "orbax_read" not in result.stderr
    assert "Exception ignored in: <coroutine object ours" in result.stderr and "torn ours" in result.stderr
