"""Runs a Python command as N processes of one `jax.distributed` job on 127.0.0.1, for tests.

Every process gets the same command line (or its own, when `argv` is a function of the process index) and
this environment on top of the caller's:

  JAX_PLATFORMS=cpu                      CPU only, so no process grabs an accelerator
  XLA_FLAGS=--xla_force_host_platform_device_count=D   D fake CPU devices per process (with
                                         train_fixtures.fake_devices_flags)
  JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT a free port; process 0 hosts the coordination service there
  JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i  read by our code, not by JAX: `jax.distributed.initialize()` reads
                                         only the coordinator address from the environment, so the caller
                                         must pass `num_processes=` and `process_id=` itself

CPU collectives across processes need nothing more: gloo over TCP is the default
`jax_cpu_collectives_implementation` once `jax.distributed` is initialised.

Each process runs in its own session (process group), so a time limit can kill it with everything it
started; its stdout and stderr go to files under `logdir`. A hung collective therefore never hangs the
caller: after `timeout_s` every process still running is killed (SIGKILL to its whole group).

    run = launch(["-m", "clsp_jax.train", "--workdir", wd], tmp_path / "logs", num_processes=2,
                 signal=Signal(process=1, signum=signal.SIGTERM, after_line="step 3"))
    assert run.ok, run.describe()
"""

from __future__ import annotations

import dataclasses
import os
import signal as signal_module
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from train_fixtures import fake_devices_flags


@dataclasses.dataclass
class Signal:
    """Send `signum` once to process `process`: after `after_line` (a substring) first appears in the stdout
    or stderr of process `watch` (default: `process` itself), then `delay_s` seconds later; with no
    `after_line`, `delay_s` after the launch."""
    process: int
    signum: int = signal_module.SIGTERM
    after_line: str | None = None
    delay_s: float = 0.0
    watch: int | None = None


@dataclasses.dataclass
class ProcessResult:
    """One process's outcome. `returncode` is negative for death by a signal (-9 when the time limit
    killed it); `wall_s` is seconds from the launch to its exit, as observed by polling."""
    index: int
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    timed_out: bool


@dataclasses.dataclass
class Run:
    """All processes' results, in process order; `signal_sent_s`: seconds from the launch to the
    signal, None when no signal was sent."""
    processes: list[ProcessResult]
    signal_sent_s: float | None

    @property
    def ok(self) -> bool:
        return all(p.returncode == 0 for p in self.processes)

    def describe(self, tail: int = 3000) -> str:
        """Every process's exit status and the tails of its stdout and stderr, for assertion messages."""
        parts = []
        for p in self.processes:
            state = "killed at the time limit" if p.timed_out else f"exit {p.returncode}"
            parts.append(f"--- process {p.index}: {state} after {p.wall_s:.1f} s\n"
                         f"[stdout]\n{p.stdout[-tail:]}\n[stderr]\n{p.stderr[-tail:]}")
        return "\n".join(parts)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(index: int, num_processes: int, devices_per_process: int, port: int,
                base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of process `index` (see the module docstring), on top of `base` (default: ours)."""
    env = dict(os.environ if base is None else base)
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=fake_devices_flags(env.get("XLA_FLAGS", ""), devices_per_process),
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(index),
               PYTHONUNBUFFERED="1")  # so a line-triggered signal sees lines as they are printed
    return env


def launch(argv: Sequence[str] | Callable[[int], Sequence[str]], logdir: str | os.PathLike, *,
           num_processes: int = 2, devices_per_process: int = 2, timeout_s: float = 120.0,
           signal: Signal | None = None, env: dict[str, str] | Callable[[int], dict[str, str]] | None = None,
           cwd: str | None = None, poll_s: float = 0.05) -> Run:
    """Runs `python *argv` as `num_processes` processes and waits for all of them (at most `timeout_s`).

    Args:
      argv: the arguments after the interpreter (`["-m", "pkg.mod", ...]` or `["script.py", ...]`), or a
        function of the process index returning them (to give one process a different flag).
      logdir: where `process{i}.stdout` / `process{i}.stderr` are written (created if missing).
      env: extra variables for every process, applied after ours, or a function of the process index
        returning them.
    """
    logdir = Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs, files = [], []
    start = time.monotonic()
    for i in range(num_processes):
        args = argv(i) if callable(argv) else argv
        penv = process_env(i, num_processes, devices_per_process, port)
        penv.update((env(i) if callable(env) else env) or {})
        out, err = open(logdir / f"process{i}.stdout", "wb"), open(logdir / f"process{i}.stderr", "wb")
        files.append((out, err))
        procs.append(subprocess.Popen([sys.executable, *args], stdout=out, stderr=err, env=penv, cwd=cwd,
                                      start_new_session=True))
    ended: dict[int, float] = {}
    timed_out: set[int] = set()
    signal_sent_s = None
    line_seen_s = None
    try:
        while len(ended) < num_processes:
            now = time.monotonic() - start
            for i, p in enumerate(procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = now
            if signal is not None and signal_sent_s is None and signal.process not in ended:
                watched = signal.process if signal.watch is None else signal.watch
                if line_seen_s is None and (signal.after_line is None or signal.after_line in _read(
                        logdir, watched)):
                    line_seen_s = now
                if line_seen_s is not None and now >= line_seen_s + signal.delay_s:
                    procs[signal.process].send_signal(signal.signum)
                    signal_sent_s = now
            if now > timeout_s:
                for i, p in enumerate(procs):
                    if i not in ended:
                        _kill_group(p)
                        timed_out.add(i)
            time.sleep(poll_s)
    finally:  # also on KeyboardInterrupt or an error here: leave no process behind
        for i, p in enumerate(procs):
            if p.poll() is None:
                timed_out.add(i)
            _kill_group(p)  # also what an exited process left running (e.g. data-loader workers)
        for out, err in files:
            out.close()
            err.close()
    results = []
    for i, p in enumerate(procs):
        p.wait()
        results.append(ProcessResult(i, p.returncode, *_read_both(logdir, i),
                                     wall_s=ended.get(i, time.monotonic() - start), timed_out=i in timed_out))
    return Run(results, signal_sent_s)


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal_module.SIGKILL)  # the session id is the child's pid (start_new_session)
    except ProcessLookupError:
        pass
    p.wait()


def _read_both(logdir: Path, i: int) -> tuple[str, str]:
    return tuple((logdir / f"process{i}.{k}").read_text(errors="replace") for k in ("stdout", "stderr"))


def _read(logdir: Path, i: int) -> str:
    return "".join(_read_both(logdir, i))
