"""The trainer as several processes (`jax.distributed` on 127.0.0.1, CPU collectives, fake devices), against
the same run as one process: equal losses, parameters and evaluations; a SIGTERM to one process stops all of
them at one step and a restart resumes the run; a process killed with -9 takes the others down within the
heartbeat bound; processes with different configs refuse to start; a checkpoint written by 2 processes on an FSDP
mesh restores on one device and on a different mesh, and export reads it in one CPU process.

Every run is the micro config (`train_fixtures.MICRO`) with 4-clip batches over a (data, fsdp, tensor) =
(1, 4, 1) mesh: parameters sharded over 4 devices, which two processes of two devices each share.
"""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import multihost
from train_fixtures import ROOT, RUN_TIMEOUT_S, fake_devices_env, micro_args, micro_data

NUM_STEPS = 5
FSDP = ["--config.train.audio_head_init_batches=0", "--config.train.mesh=(1,4,1)", "--config.data.batch_size_multiple=4",
        "--config.data.max_audio_seconds_per_batch=42.0", f"--config.train.num_steps={NUM_STEPS}",
        "--config.train.checkpoint_every_steps=3", "--config.train.checkpoint_every_minutes=0",
        "--config.train.preemption_check_every_steps=1", "--config.optim.eps=1e-3"]
# optim.eps 1e-3: Adam's first updates are ~sign(gradient), so where a gradient is ~0 the float32 summation
# order (one process's reduction vs a cross-process one) would become lr-sized parameter differences.
# The three default evaluators on the dev split, each on its own period (and the last step): retrieval every
# 3 steps (3, 5), zero-shot gender every 2 (2, 4, 5), linear probes at the end (5); the best zero-shot UA
# checkpoint is kept beside the newest one. (The probe's numbers are tested in test_probe.py: 3 dev clips are
# too few to fit one.)
PERIODS = {"dev": 3, "dev_zeroshot": 2, "dev_probe": 5}
EVAL = [*(f"--config.eval.evaluators.{name}.every_steps={every}" for name, every in PERIODS.items()),
        "--config.data.eval_batch_size=8", "--config.train.keep_best_metric=dev_zeroshot/gender/UA",
        "--config.train.keep_checkpoints=1"]
# A dead peer is declared after 10 s of silence (60 s by default).
ENV = {"CLSP_HEARTBEAT_TIMEOUT_S": "10", "CLSP_SHUTDOWN_TIMEOUT_S": "60"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return micro_data(tmp_path_factory.mktemp("multihost"), splits=("train", "dev"))


def _one_process(workdir, data_dir, *extra, devices=4, timeout=RUN_TIMEOUT_S):
    env = fake_devices_env(devices)
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    return subprocess.run([sys.executable, *micro_args(workdir, data_dir, *_fsdp(*extra))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _fsdp(*extra):
    """FSDP's flags, with `extra` replacing those of the same keys."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [f for f in FSDP if f.split("=", 1)[0] not in keys] + list(extra)


def _two_processes(workdir, data_dir, *extra, logs=None, timeout=RUN_TIMEOUT_S, signal=None, argv=None):
    args = argv or (lambda i: micro_args(workdir, data_dir, *_fsdp(*extra)))
    return multihost.launch(args, logs or f"{workdir}.logs", num_processes=2, devices_per_process=2,
                            timeout_s=timeout, signal=signal, env=ENV, cwd=ROOT)


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _losses(workdir):
    return {r["step"]: r["loss"] for r in _rows(workdir) if "loss" in r}


def _evals(workdir):
    return {(r["step"], k): v for r in _rows(workdir) if "loss" not in r for k, v in r.items() if k != "step"}


def _params(workdir, step=None):
    from clsp_jax.train.checkpoint import restore_params

    params, _, step = restore_params(str(workdir), step)
    return step, params


def _relative(a, b) -> float:
    import jax

    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(a) == len(b)
    diff = max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(a, b))
    return diff / max(float(np.max(np.abs(np.asarray(y)))) for y in b)


def _saved_steps(workdir):
    from clsp_jax.train.checkpoint import make_manager

    return sorted(make_manager(str(workdir), read_only=True).all_steps())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The run as one process with 4 devices, evaluating every 3 steps."""
    workdir = tmp_path_factory.mktemp("one") / "run"
    result = _one_process(workdir, data_dir, *EVAL)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


@pytest.fixture(scope="module")
def two(tmp_path_factory, data_dir):
    """The same run as 2 processes x 2 devices."""
    workdir = tmp_path_factory.mktemp("two") / "run"
    run = _two_processes(workdir, data_dir, *EVAL)
    assert run.ok, run.describe()
    return workdir, run


def test_two_processes_equal_one(reference, two):
    workdir, run = two
    ref_losses, losses = _losses(reference), _losses(workdir)
    assert sorted(ref_losses) == sorted(losses) == list(range(1, NUM_STEPS + 1))
    np.testing.assert_allclose([losses[s] for s in ref_losses], list(ref_losses.values()), rtol=1e-6)
    # Periodic evaluation across processes (each embeds its padded share) equals the one-process one.
    ref_evals, evals = _evals(reference), _evals(workdir)
    assert set(evals) == set(ref_evals)
    for key, value in ref_evals.items():
        assert evals[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    # Each evaluator logged at the multiples of its period and at the last step, under its name.
    for name, every in PERIODS.items():
        assert sorted({s for s, k in ref_evals if k.startswith(name + "/")}) == sorted(
            {*range(every, NUM_STEPS + 1, every), NUM_STEPS}), name
    assert {"dev/global/s2t/R@1", "dev_zeroshot/gender/WA", "dev_probe/gender/num_clips"} <= {k for _, k in ref_evals}
    # Kept: the newest checkpoint and the best by zero-shot UA among the evaluated steps (ties: the later one).
    ua = {s: v for (s, k), v in ref_evals.items() if k == "dev_zeroshot/gender/UA"}
    best = max(ua, key=lambda s: (ua[s], s))
    print("zero-shot UA by step", ua)
    assert _saved_steps(workdir) == _saved_steps(reference) == sorted({best, NUM_STEPS})
    (s1, a), (s2, b) = _params(reference), _params(workdir)
    assert s1 == s2 == NUM_STEPS
    assert _relative(b, a) <= 1e-6
    # One metrics file and one config, written by process 0; every process printed its pre-flight line.
    assert os.path.exists(workdir / "config.json") and not os.path.exists(f"{workdir}/metrics.jsonl.1")
    for i, p in enumerate(run.processes):
        assert f"process {i} of 2: 2 local / 4 global devices (cpu), mesh {{'data': 1, 'fsdp': 4" in p.stderr


def test_sigterm_to_one_process_then_resume_then_kill9_of_one(tmp_path, data_dir, reference):
    """SIGTERM to process 1 stops both after one step with one checkpoint and exit 0; the restart resumes from it
    and trains on as the uninterrupted run did (equal losses), until a kill -9 of process 1 takes process 0 down
    within the heartbeat bound. (A restart after that resumes from the same checkpoint as this one did.)"""
    workdir = tmp_path / "run"
    run = _two_processes(workdir, data_dir, logs=tmp_path / "sigterm", signal=multihost.Signal(
        process=1, signum=signal.SIGTERM, after_line=f"step 1/{NUM_STEPS}", watch=0))
    assert run.ok, run.describe()  # every process exits 0
    assert run.signal_sent_s is not None
    stopped = max(p.wall_s for p in run.processes) - run.signal_sent_s
    print(f"SIGTERM to process 1 -> both processes exited {stopped:.1f} s later")
    saved = _saved_steps(workdir)
    # One checkpoint, at the step they stopped: the host runs up to 2 steps ahead of the printed one, and the
    # restart below must have a step left after the one it resumes with.
    assert len(saved) == 1 and 1 <= saved[0] < NUM_STEPS - 1, saved
    assert "SIGTERM" in run.processes[1].stderr and "stopping after step" in run.processes[0].stderr

    resumed_step = saved[0] + 1
    run = _two_processes(workdir, data_dir, logs=tmp_path / "kill9", signal=multihost.Signal(
        process=1, signum=signal.SIGKILL, after_line=f"step {resumed_step}/{NUM_STEPS}", watch=0))
    killed, survivor = run.processes[1], run.processes[0]
    assert "resumed from" in survivor.stderr and f"at step {saved[0]}" in survivor.stderr, run.describe()
    # metrics.jsonl (process 0's, a flushed line per step): the steps before the stop and the resumed step
    # equal the uninterrupted run's.
    ref, losses = _losses(reference), _losses(workdir)
    assert sorted(losses) == list(range(1, resumed_step + 1)), sorted(losses)
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [ref[s] for s in sorted(losses)], rtol=1e-6)
    assert killed.returncode == -signal.SIGKILL, run.describe()
    assert survivor.returncode != 0 and not survivor.timed_out, run.describe()
    detected = survivor.wall_s - run.signal_sent_s
    print(f"kill -9 of process 1 -> process 0 exited {detected:.1f} s later")
    assert detected < 60
    assert any(m in survivor.stderr for m in ("stopped sending heartbeats", "Gloo", "unhealthy")), run.describe()


def test_processes_with_different_configs_refuse_to_start(tmp_path, data_dir):
    workdir = tmp_path / "run"
    odd = ["--config.optim.base_lr=0.003"]
    run = _two_processes(workdir, data_dir, argv=lambda i: micro_args(workdir, data_dir, *_fsdp(*(odd if i else []))),
                         timeout=180)
    assert [p.returncode for p in run.processes] == [2, 2], run.describe()
    for p in run.processes:
        assert "different configs" in p.stderr
        assert "optim.base_lr is 0.002 on process 0 but 0.003 on process 1" in p.stderr
    assert not os.path.exists(workdir / "checkpoints")


def _continue(source, workdir, data_dir, devices, mesh):
    """Copies a finished run and trains it 2 steps further as one process on `devices` devices and `mesh`."""
    import shutil

    shutil.copytree(source, workdir)
    result = _one_process(workdir, data_dir, f"--config.train.num_steps={NUM_STEPS + 2}",
                          f"--config.train.mesh={mesh}", devices=devices)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"at step {NUM_STEPS}" in result.stderr and "resumed from" in result.stderr
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, NUM_STEPS + 3))
    return losses


@pytest.fixture(scope="module")
def on_one_device(tmp_path_factory, data_dir, two):
    return _continue(two[0], tmp_path_factory.mktemp("one_device") / "run", data_dir, 1, "(1,1,1)")


def test_checkpoint_of_two_processes_resumes_on_one_device_and_exports(tmp_path, on_one_device, two):
    source, _ = two
    assert all(np.isfinite(on_one_device[s]) for s in (NUM_STEPS + 1, NUM_STEPS + 2))
    # Export reads the 2-process checkpoint in one single-device CPU process.
    out = tmp_path / "export"
    env = fake_devices_env(1)
    result = subprocess.run([sys.executable, "-m", "clsp_jax.export", "--workdir", str(source), "--out", str(out),
                             "--format", "orbax"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    from flax import nnx

    from clsp_jax import CLSP

    model = CLSP.load(str(out))
    assert _relative(nnx.to_pure_dict(nnx.state(model.net, nnx.Param)), _params(source)[1]) == 0.0


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_on_a_data_parallel_mesh(tmp_path, data_dir, two, on_one_device):
    losses = _continue(two[0], tmp_path / "run", data_dir, 4, "(4,1,1)")
    np.testing.assert_allclose([losses[s] for s in (NUM_STEPS + 1, NUM_STEPS + 2)],
                               [on_one_device[s] for s in (NUM_STEPS + 1, NUM_STEPS + 2)], rtol=1e-5)


def test_resume_with_another_global_batch_is_refused(tmp_path, data_dir, two):
    import shutil

    source, _ = two
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    result = _one_process(workdir, data_dir, "--config.data.max_audio_seconds_per_batch=84.0", timeout=RUN_TIMEOUT_S)
    assert result.returncode == 2, result.stderr[-4000:]
    assert "data.max_audio_seconds_per_batch" in result.stderr and "42.0" in result.stderr
    assert not os.path.exists(workdir / "checkpoints" / str(NUM_STEPS + 1))


@pytest.mark.slow
def test_four_processes_equal_one(tmp_path, data_dir, reference):
    workdir = tmp_path / "run"
    run = multihost.launch(micro_args(workdir, data_dir, *FSDP, *EVAL), tmp_path / "logs", num_processes=4,
                           devices_per_process=1, timeout_s=RUN_TIMEOUT_S, env=ENV, cwd=ROOT)
    assert run.ok, run.describe()
    ref = _losses(reference)
    np.testing.assert_allclose([_losses(workdir)[s] for s in ref], list(ref.values()), rtol=1e-6)
    assert _relative(_params(workdir)[1], _params(reference)[1]) <= 1e-6
