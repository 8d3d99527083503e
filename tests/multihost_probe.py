"""A tiny `jax.distributed` program for tests/test_multihost_harness.py, run by `multihost.launch`.

Default: joins the job described by JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, then
prints one JSON line: process index and count, local and global device counts, the `psum` over all
global devices of (global device index + 1) computed by a jitted reduction of a sharded array, and
`process_allgather` of every process's index.

  --exit-code K   exit with status K after the collectives and a clean distributed shutdown (default 0)
  --hang          print the pid of a child process it starts, then sleep forever, before joining the job
"""

import argparse
import faulthandler
import json
import os
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exit-code", type=int, default=0)
    parser.add_argument("--hang", action="store_true")
    args = parser.parse_args()
    if args.hang:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10**6)"])
        print(json.dumps({"child_pid": child.pid}), flush=True)
        while True:
            time.sleep(1)

    # A normal run takes seconds. Should one hang, every thread's Python stack goes to stderr every 30 s, and
    # the harness's report of the killed process shows where it hung.
    faulthandler.dump_traceback_later(30, repeat=True)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    # JAX reads only the coordinator address from the environment; the count and the index are ours.
    jax.distributed.initialize(num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]),
                               initialization_timeout=60, heartbeat_timeout_seconds=10)
    mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("d"))
    # Row g of the global (devices, 1) array holds g + 1; each process fills only its own devices' rows.
    values = np.arange(1, jax.device_count() + 1, dtype=np.float32)[:, None]
    x = jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    indices = multihost_utils.process_allgather(np.int32(jax.process_index()))
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "local_devices": jax.local_device_count(), "devices": jax.device_count(),
                      "psum": float(total), "allgather": np.asarray(indices).tolist()}), flush=True)
    jax.distributed.shutdown()  # the peers' shutdown waits for this one's
    # Leave without the interpreter's teardown of JAX's backend: once in the suite (about 1 run in 20) process 0
    # did not exit within 120 s after this clean shutdown, with its peer already gone.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(args.exit_code)


if __name__ == "__main__":
    main()
