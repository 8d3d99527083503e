"""Several processes, one run: start-up, agreement before compiling, stopping together, and a pre-flight line.

JAX's multi-controller runtime (`jax.distributed`) runs one Python process per host (or per GPU); each
process feeds its own devices and every process executes the same program. This module holds what the
trainer needs on top of that:

- `initialize()`: joins the processes of a launch: an explicit coordinator (JAX_COORDINATOR_ADDRESS with
  JAX_NUM_PROCESSES and JAX_PROCESS_ID, all three read here), SLURM with more than one task, or a
  multi-worker Cloud TPU slice (JAX detects both). A dead peer is detected by the coordination service's
  heartbeats (`CLSP_HEARTBEAT_TIMEOUT_S`), so the others fail with an error instead of hanging.
- `check_same_config(config)`: every process must run the same resolved config; a process with a different
  override stops all of them before anything compiles, naming the differing keys.
- `Preemption`: SIGTERM sets a flag on the process that got it; `agreed(step)` combines the flags of all
  processes through the coordination service every few steps, so every process leaves the loop after the
  same step and they write one checkpoint together (a process that stopped alone would leave the others waiting in a
  collective). JAX's own preemption notice (Orbax's `reached_preemption`) was not used: the signal handler
  it relies on is replaced by any Python handler, and it does nothing for a single process.
- A process that dies (kill -9, a lost host) stops sending heartbeats; after `CLSP_HEARTBEAT_TIMEOUT_S`
  (default 60 s) the coordination service aborts every other process with "stopped sending heartbeats"
  instead of leaving them waiting in a collective forever. A process that fails with an error exits at once
  (`clsp_jax.train`'s entry point), so the others follow within the same bound.
- `log_preflight(...)`: one line per process at start (process i of N, devices, mesh, per-device batch,
  work dir), and the checks for the classic launch mistakes.
"""

from __future__ import annotations

import json
import logging
import os
import signal

import jax

log = logging.getLogger(__name__)

# A peer silent this long is declared dead and every process aborts (JAX's own default is 100 s).
HEARTBEAT_TIMEOUT_S = 60
# How long a finished process waits for the others at exit; longer than any end-of-run work of process 0 alone.
SHUTDOWN_TIMEOUT_S = 120


def launched_with_several_processes(env=os.environ) -> bool:
    """Whether this launch asks for `jax.distributed` (see the module doc)."""
    if "JAX_COORDINATOR_ADDRESS" in env:
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        return True
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize(env=os.environ) -> bool:
    """Calls `jax.distributed.initialize()` when launched as one of several processes; returns whether it
    did. Raises ValueError (one line) for an explicit coordinator without JAX_NUM_PROCESSES/JAX_PROCESS_ID."""
    if not launched_with_several_processes(env) or jax.distributed.is_initialized():
        return False
    kwargs = dict(heartbeat_timeout_seconds=int(env.get("CLSP_HEARTBEAT_TIMEOUT_S", HEARTBEAT_TIMEOUT_S)),
                  shutdown_timeout_seconds=int(env.get("CLSP_SHUTDOWN_TIMEOUT_S", SHUTDOWN_TIMEOUT_S)))
    if "JAX_COORDINATOR_ADDRESS" in env:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} is not: every process "
                             "needs the coordinator's address, the number of processes and its own id")
        kwargs.update(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)
    return True


def flatten_config(tree, prefix: str = "") -> dict[str, str]:
    """{"a.b": JSON of the value} for every leaf of a nested dict."""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten_config(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(tree, default=str, sort_keys=True)}


def config_differences(a: dict, b: dict) -> list[tuple[str, str, str]]:
    """(key, value in a, value in b) for every key whose value differs between two flattened configs
    (`flatten_config`), sorted by key; a missing key's value is "<unset>"."""
    return [(k, a.get(k, "<unset>"), b.get(k, "<unset>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _client():
    """The coordination service's client (key-value store and barriers). jax has no public accessor for it;
    this is the object `jax.distributed.initialize()` creates."""
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def check_same_config(config: dict, timeout_s: float = 300.0) -> None:
    """Raises ValueError on every process unless all processes hold the same config (a resolved config as a
    dict), naming the differing keys and their values.

    Each process publishes its flattened config in the coordination service's key-value store and waits at
    a barrier; no device collective runs (and nothing compiles), so a mismatch is reported in milliseconds.
    """
    if jax.process_count() == 1:
        return
    client, me = _client(), jax.process_index()
    client.key_value_set(f"clsp_config/{me}", json.dumps(flatten_config(config)))
    client.wait_at_barrier("clsp_config_published", int(timeout_s * 1000))
    everyone = {int(k.rsplit("/", 1)[1]): json.loads(v) for k, v in client.key_value_dir_get("clsp_config/")}
    differing = [f"{key} is {a} on process 0 but {b} on process {p}"
                 for p, theirs in sorted(everyone.items()) for key, a, b in config_differences(everyone[0], theirs)]
    # Every process has read every config before any of them stops (and takes the coordinator down with it).
    client.wait_at_barrier("clsp_config_compared", int(timeout_s * 1000))
    if differing:
        raise ValueError("the processes were started with different configs (every process must get the same "
                         "--config flags): " + "; ".join(differing[:6]))


def check_launch(platform: str, local_devices: int, env=os.environ) -> None:
    """Raises ValueError for the classic GPU launch mistakes under SLURM: one task per GPU where each task
    still sees every GPU of its node (the tasks would share devices), or one task per node that sees only
    one of several GPUs (CUDA_VISIBLE_DEVICES or --gpus-per-task left at 1)."""
    gpus = env.get("SLURM_GPUS_ON_NODE")
    tasks = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "").split("(")[0]
    if platform != "gpu" or not gpus or not tasks or not gpus.isdigit() or not tasks.isdigit():
        return
    gpus, tasks = int(gpus), int(tasks)
    if local_devices * tasks != gpus:
        raise ValueError(f"SLURM gives this node {gpus} GPUs and {tasks} task(s), but this process sees "
                         f"{local_devices} GPU(s): run one task per GPU with each task seeing one GPU "
                         "(--ntasks-per-node=GPUS --gpus-per-task=1), or one task per node seeing all of them "
                         "(--ntasks-per-node=1 --gpus-per-node=GPUS)")


def check_shared_workdir(workdir: str, timeout_s: float = 300.0) -> None:
    """Raises ValueError on every process unless all processes see the same work dir: process 0 writes a
    marker there, the others look for it. (Checkpoints of a multi-process run are written by every process
    into one directory tree, so it must be shared: a network file system or a bucket.)"""
    if jax.process_count() == 1:
        return
    from etils import epath

    client, me = _client(), jax.process_index()
    if me == 0:  # a fresh name per run: a marker left on a host-local disk by an earlier run cannot pass
        client.key_value_set("clsp_workdir_marker", f".shared_check_{os.urandom(8).hex()}")
    marker = epath.Path(workdir) / client.blocking_key_value_get("clsp_workdir_marker", int(timeout_s * 1000))
    if me == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("written by process 0")
    client.wait_at_barrier("clsp_workdir_marker_written", int(timeout_s * 1000))
    client.key_value_set(f"clsp_workdir_seen/{me}", "1" if marker.exists() else "0")
    client.wait_at_barrier("clsp_workdir_marker_read", int(timeout_s * 1000))
    if me == 0:
        marker.unlink(missing_ok=True)
    blind = sorted(int(k.rsplit("/", 1)[1]) for k, v in client.key_value_dir_get("clsp_workdir_seen/") if v != "1")
    if blind:
        raise ValueError(f"the work dir {workdir} is not shared: process 0 wrote a file there that process(es) "
                         f"{blind} cannot see; use a directory every host mounts (NFS, Lustre, a gcsfuse mount) or "
                         "a gs:// path")


def barrier(name: str, timeout_s: float = 600.0) -> None:
    """Every process waits here until all have arrived (no-op for one process). Host-side only: the
    coordination service's barrier, no device computation."""
    if jax.process_count() > 1:
        _client().wait_at_barrier(name, int(timeout_s * 1000))


def all_agree(name: str, ok: bool, timeout_s: float = 600.0) -> bool:
    """Whether `ok` holds on every process (each process calls it with the same unique `name`); `ok` itself
    for one process. Host-side only, through the coordination service: for decisions that each process takes
    from its own files (a checkpoint it could read, a save it finished), which must come out the same."""
    if jax.process_count() == 1:
        return ok
    client = _client()
    if not ok:
        client.key_value_set(f"{name}/{jax.process_index()}", "0")
    client.wait_at_barrier(name, int(timeout_s * 1000))
    return not client.key_value_dir_get(f"{name}/")


def leave_together(timeout_s: float = 5.0) -> None:
    """Waits up to `timeout_s` for every process at an exit barrier, and when all came, disconnects from the
    coordination service together (`jax.distributed.shutdown`), so that process 0, which hosts the service,
    cannot stop it under a peer that is still connected: that peer's client would abort the process instead
    of letting it exit with its own code. Errors are ignored: peers may be dead or stuck in a collective, and
    then this process leaves alone."""
    try:
        _client().wait_at_barrier("clsp_exit", int(timeout_s * 1000))
        jax.distributed.shutdown()
    except Exception:  # noqa: BLE001 - best effort on the way out
        pass


class Preemption:
    """SIGTERM -> a flag; `agreed(step)` is True on every process, at the same step, once any process got
    SIGTERM.

    With several processes the flags are combined every `every_steps` steps through the coordination
    service (each process publishes its flag under a key of that step, all meet at a barrier, all read the
    same keys): no device computation, so the host keeps running ahead of the devices, and each check costs
    one barrier round trip. One process checks its own flag at every step. `stopping` is the agreed value
    (the local flag alone must not decide anything collective, such as skipping an evaluation).

    Create it after `initialize()`: `jax.distributed.initialize()` installs a SIGTERM handler of its own,
    which this one replaces (JAX's would let the signal pass unnoticed by the loop).
    """

    def __init__(self, every_steps: int = 10, timeout_s: float = 3600.0):
        self.requested, self.stopping = False, False
        self.every_steps, self.timeout_ms = max(1, int(every_steps)), int(timeout_s * 1000)
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint and exiting")
        self.requested = True

    def agreed(self, step: int) -> bool:
        if jax.process_count() == 1:
            self.stopping = self.requested
        elif step % self.every_steps == 0:
            client, me = _client(), jax.process_index()
            if self.requested:
                client.key_value_set(f"clsp_stop/{step}/{me}", "1")
            client.wait_at_barrier(f"clsp_stop_check_{step}", self.timeout_ms)
            asking = sorted(int(k.rsplit("/", 1)[1]) for k, _ in client.key_value_dir_get(f"clsp_stop/{step}/"))
            if asking and not self.requested:
                log.warning("process(es) %s got SIGTERM: stopping after step %d with them", asking, step)
            self.stopping = bool(asking)
        return self.stopping

    def close(self):
        signal.signal(signal.SIGTERM, self._previous)


def log_preflight(mesh, workdir: str, batch_description: str) -> None:
    """One line on every process: who it is, what it sees, where it writes."""
    log.info("process %d of %d: %d local / %d global devices (%s), mesh %s, %s, work dir %s", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform,
             dict(mesh.shape), batch_description, workdir)
