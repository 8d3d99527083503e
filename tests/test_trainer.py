"""The trainer end to end on a micro config: config errors, kill -9 resume, SIGTERM, metrics files."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from train_fixtures import ROOT, RUN_TIMEOUT_S, fake_devices_env, micro_command as _command, micro_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return micro_data(tmp_path_factory.mktemp("micro"))


def _run(workdir, data_dir, *extra, timeout=RUN_TIMEOUT_S, env=None):
    return subprocess.run(_command(workdir, data_dir, *extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _params(workdir, averaged=False):
    from clsp_jax.train.checkpoint import restore_params
    import jax

    params, _, step = restore_params(str(workdir), averaged=averaged)
    return step, jax.tree.leaves(params)


def _signal_once_logged(workdir, data_dir, extra, step, sig):
    """Starts a run and sends it `sig` as soon as `step` appears in its metrics.jsonl.

    Its stderr goes to `<workdir>.stderr` (a pipe could fill up and stall the run)."""
    log = open(f"{workdir}.stderr", "w")
    proc = subprocess.Popen(_command(workdir, data_dir, *extra), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(workdir / "metrics.jsonl") and step in _losses(workdir):
            proc.send_signal(sig)
            break
        time.sleep(0.2)
    return proc


@pytest.mark.parametrize("extra,message", [
    (["--config.train.no_such_key=1"], "no_such_key"),
    (["--config.train.num_steps=many"], "num_steps"),
    (["--config.train.mesh=(2,1,1)"], "mesh shape"),
    (["--config.model.head_init=xavier"], "config error: model: head_init must be one of ('torch', 'lecun')"),
    (["--config.optim.frozen=()"], "train.cache_text_states: caching text states needs the text encoder frozen"),
    (["--config.train.cache_speech_states=True"],  # MICRO's speech tower trains
     "train.cache_speech_states: caching speech states needs the whole speech tower frozen"),
    (["--config.train.keep_best_metric=dev/global/s2t/R@1"],  # MICRO turns the dev evaluators off
     "train.keep_best_metric 'dev/global/s2t/R@1' must be '<evaluator>/<metric>' of an enabled evaluator"),
])
def test_bad_config_fails_at_start(tmp_path, data_dir, extra, message):
    result = _run(tmp_path / "run", data_dir, *extra, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_data_dir_and_batch_multiple_fail_with_one_line(tmp_path, data_dir):
    result = _run(tmp_path / "run", str(tmp_path / "nowhere"), timeout=120)
    assert result.returncode == 2
    assert "config error: data.data_dir" in result.stderr and "nowhere" in result.stderr
    two_devices = fake_devices_env(2)
    result = _run(tmp_path / "run", data_dir, "--config.data.batch_size_multiple=3", "--config.train.mesh=(2,1,1)",
                  timeout=120, env=two_devices)
    assert result.returncode == 2 and "batch_size_multiple=3" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cached_speech_states_train_the_heads_over_the_frozen_tower(tmp_path, data_dir):
    """With the speech tower frozen and cached (as in `make demo`), the run trains the audio head while the
    tower's weights stay as they were (checkpoints of steps 1 and 3)."""
    run = tmp_path / "run"
    frozen = "--config.optim.frozen=('^text_encoder/(embeddings|encoder)/','^speech/')"
    result = _run(run, data_dir, frozen, "--config.train.cache_speech_states=True", "--config.train.num_steps=3",
                  "--config.train.audio_head_init_batches=0", "--config.train.checkpoint_every_steps=1",
                  "--config.train.keep_checkpoints=3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(np.isfinite(list(_losses(run).values()))) and sorted(_losses(run)) == [1, 2, 3]
    from clsp_jax.train.checkpoint import restore_params
    import jax

    (first, _, _), (last, _, _) = restore_params(str(run), 1), restore_params(str(run), 3)
    for a, b in zip(jax.tree.leaves(first["speech"]), jax.tree.leaves(last["speech"])):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree.leaves(first["audio_projection"]), jax.tree.leaves(last["audio_projection"])))


def test_too_many_non_finite_losses_stop_with_a_checkpoint(tmp_path, data_dir):
    """A learning rate of 1e38 overflows the weights after the first update: every later loss is NaN, each
    update is skipped and counted, and the third in a row stops the run with a message and a checkpoint.

    The same run carries the speed figures (model TFLOP/s per device from the compiled step's FLOPs, MFU
    against the given peak of 0.1 TFLOP/s, the audio's padding share: the micro data has clips of varied
    length in one 10.5 s bucket) and a profile of steps 2-5, cut short at step 3 by the stop: the trace
    is still written, as one XSpace file TensorBoard's profile plugin reads, holding the step's XLA ops."""
    run = tmp_path / "run"
    result = _run(run, data_dir, "--config.optim.base_lr=1e38", "--config.train.max_nonfinite_streak=2",
                  "--config.train.num_steps=20", "--config.train.audio_head_init_batches=0",
                  "--config.train.profile_steps=(2,5)")
    assert result.returncode != 0
    assert "consecutive non-finite losses" in result.stderr and "checkpoint saved" in result.stderr, \
        result.stderr[-2000:]
    rows = [json.loads(line) for line in open(run / "metrics.jsonl") if line.strip()]
    assert rows and rows[-1]["nonfinite_streak"] == 3 and rows[-1]["step"] < 20
    timed = rows[1:]  # the first row has no interval to measure yet
    for r in timed:
        assert r["model_tflops_per_device"] > 0
        assert r["mfu"] == pytest.approx(r["model_tflops_per_device"] / 0.1)
        assert 0.0 < r["padding_fraction"] < 1.0
    assert "TFLOP/s/device MFU" in result.stdout and "padding" in result.stdout, result.stdout[-2000:]
    traces = list((run / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1, list((run / "profile").rglob("*"))
    import jax

    names = {event.name for plane in jax.profiler.ProfileData.from_file(str(traces[0])).planes
             for line in plane.lines for event in line.events}
    assert any("train_step" in n or "jit_" in n for n in names), sorted(names)[:50]
    from clsp_jax.train.checkpoint import make_manager

    assert make_manager(str(run), read_only=True).latest_step() == rows[-1]["step"] + 1


def test_peak_flops_is_the_config_value_or_a_measured_matmul():
    import jax.numpy as jnp
    import ml_collections

    from clsp_jax.train.speed import peak_flops_per_device

    assert peak_flops_per_device(ml_collections.ConfigDict({"peak_tflops_per_device": 2.5}), jnp.float32) == 2.5e12
    measured = peak_flops_per_device(ml_collections.ConfigDict({"peak_tflops_per_device": None}), jnp.float32,
                                     size=256)
    assert 1e8 < measured < 1e14  # a 256^2 float32 matmul on a CPU: between 0.1 GFLOP/s and 100 TFLOP/s


@pytest.mark.slow  # the default run covers SIGTERM, kill -9 and resume with 2 processes (test_multihost_train.py)
def test_kill9_and_sigterm_resume_reproduce_the_uninterrupted_run(tmp_path, data_dir):
    steps = ["--config.train.num_steps=8", "--config.train.checkpoint_every_steps=3",
             "--config.train.checkpoint_every_minutes=0", "--config.optim.average_period=2"]
    full = tmp_path / "full"
    result = _run(full, data_dir, *steps)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = _losses(full)
    assert sorted(reference) == list(range(1, 9))
    assert all(np.isfinite(v) for v in reference.values())
    assert os.path.exists(full / "config.json") and os.listdir(full / "tensorboard")
    with open(full / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    for key in ("learning_rate", "logit_scale", "samples_per_second", "audio_hours_per_second", "data_wait_fraction",
                "model_tflops_per_device", "mfu", "padding_fraction"):
        assert all(np.isfinite(r[key]) for r in train_rows), key
    assert all(0.0 <= r["data_wait_fraction"] <= 1.0 for r in train_rows)

    # kill -9 once step 4 is logged (a checkpoint exists at 3), then resume with the same command.
    killed = tmp_path / "killed"
    proc = _signal_once_logged(killed, data_dir, steps, 4, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    result = _run(killed, data_dir, *steps)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = _losses(killed)
    assert sorted(resumed) == sorted(reference)
    np.testing.assert_allclose([resumed[s] for s in sorted(reference)], [reference[s] for s in sorted(reference)],
                               rtol=1e-6, atol=1e-6)
    for averaged in (False, True):  # the weights, and their running average (steps 2, 4, 6, 8; resumed at 3)
        (s1, a), (s2, b) = _params(full, averaged), _params(killed, averaged)
        assert s1 == s2 == 8
        for x, y in zip(a, b):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)

    # SIGTERM: a checkpoint at the current step, exit 0; the restart continues to the end.
    termed = tmp_path / "termed"
    proc = _signal_once_logged(termed, data_dir, steps, 2, signal.SIGTERM)
    proc.wait(timeout=300)
    assert proc.returncode == 0, open(f"{termed}.stderr").read()[-3000:]
    from clsp_jax.train.checkpoint import make_manager

    saved = make_manager(str(termed), read_only=True).all_steps()
    assert saved and max(saved) >= 2 and max(saved) < 8
    result = _run(termed, data_dir, *steps)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose([_losses(termed)[s] for s in range(1, 9)], [reference[s] for s in range(1, 9)],
                               rtol=1e-6, atol=1e-6)
