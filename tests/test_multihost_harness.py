"""Tests of tests/multihost.py, the multi-process launcher, on tests/multihost_probe.py (2 processes x 2
fake CPU devices over `jax.distributed` on 127.0.0.1)."""

import json
import os
import signal
import time
from pathlib import Path

import multihost

PROBE = str(Path(__file__).with_name("multihost_probe.py"))


def _report(text: str) -> dict:
    """The probe's JSON line in a process's stdout (gloo prints its own lines there too)."""
    lines = [line for line in text.splitlines() if line.startswith("{")]
    assert lines, f"no JSON line in:\n{text}"
    return json.loads(lines[-1])


def test_two_processes_agree_on_collectives(tmp_path):
    run = multihost.launch([PROBE], tmp_path, num_processes=2, devices_per_process=2, timeout_s=120)
    assert run.ok, run.describe()
    reports = [_report(p.stdout) for p in run.processes]
    for i, r in enumerate(reports):
        assert (r["process"], r["processes"], r["local_devices"], r["devices"]) == (i, 2, 2, 4)
        assert r["psum"] == 1 + 2 + 3 + 4  # every global device's row, from both processes
        assert r["allgather"] == [0, 1]
    assert (tmp_path / "process1.stdout").read_text() == run.processes[1].stdout


def test_nonzero_exit_is_reported(tmp_path):
    run = multihost.launch(lambda i: [PROBE, "--exit-code", "3"] if i == 1 else [PROBE], tmp_path,
                           timeout_s=120)
    assert not run.ok
    assert [p.returncode for p in run.processes] == [0, 3], run.describe()
    assert not any(p.timed_out for p in run.processes)


def test_time_limit_kills_the_whole_process_group(tmp_path):
    clock = time.monotonic()
    run = multihost.launch(lambda i: [PROBE, "--hang"] if i == 0 else ["-c", "pass"], tmp_path, timeout_s=3)
    assert time.monotonic() - clock < 30
    hung, done = run.processes
    assert hung.timed_out and hung.returncode == -signal.SIGKILL
    assert not done.timed_out and done.returncode == 0
    child = _report(hung.stdout)["child_pid"]  # started by the hung process, in its process group
    time.sleep(0.2)
    assert not _alive(child), "the hung process's child survived the time limit"


def test_signal_after_a_line(tmp_path):
    script = ("import os, signal, sys, time\n"
              "signal.signal(signal.SIGTERM, lambda *a: sys.exit(int(os.environ['CODE_ON_TERM'])))\n"
              "print('ready', flush=True)\n"
              "time.sleep(60)\n")
    run = multihost.launch(lambda i: ["-c", script] if i == 1 else ["-c", "pass"], tmp_path, timeout_s=30,
                           env=lambda i: {"CODE_ON_TERM": str(6 + i)},  # a per-process environment
                           signal=multihost.Signal(process=1, signum=signal.SIGTERM, after_line="ready"))
    assert [p.returncode for p in run.processes] == [0, 7], run.describe()
    assert run.signal_sent_s is not None and run.processes[1].wall_s >= run.signal_sent_s


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (already dead, not yet reaped by init) counts as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False
