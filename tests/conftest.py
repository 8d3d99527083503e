"""Session settings and fixtures shared by test modules.

- XLA:CPU compiles with LLVM at -O0 and without its expensive passes: the suite mostly compiles small
  programs to run them once or twice, which this makes ~35% faster. Child processes inherit the flags, so
  both sides of every comparison run under them. Collectives of fake devices wait up to 600 s for each other.
- One persistent XLA cache for the micro trainer runs of the whole session (every xdist worker), so the
  micro config's programs compile once rather than once per test module.
- Modules that start trainer processes are scheduled first, so that under `-n 2 --dist loadfile` neither
  worker is left with a long module at the end.
- Fixtures: the CLI tests' (test_embed.py, test_eval_cli.py) saved tiny CLSP and in-process runner of the test
  module's `cli.main`; the GCS emulator of the gs:// tests (`gcs`, `gcs_path`, one emulator for the session,
  started on first use).
"""

import os
import shutil
import tempfile

_SUITE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
                # On a loaded box the threads of fake devices can reach a collective more than XLA:CPU's default
                # 40 s apart, and XLA then aborts the process (seen with jax 0.11.2 at load 12 on 2 cores).
                "--xla_cpu_collective_call_terminate_timeout_seconds=600")
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_flags, *(f for f in _SUITE_FLAGS if f.split("=")[0] not in _flags)]).strip()

import pytest  # noqa: E402  (after XLA_FLAGS: no JAX backend may start before it is set)
from eval_fixtures import cli_runner, saved_tiny_clsp  # noqa: E402
from gcs_emulator import gcs, gcs_path  # noqa: E402,F401  (pytest fixtures)
from train_fixtures import XLA_CACHE_ENV  # noqa: E402

# Longest first (seconds on a 2-core box); the rest keep their order.
HEAVY_FIRST = ["test_multihost_train.py", "test_train_sharded.py", "test_step.py", "test_trainer.py",
               "test_checkpoint_faults.py", "test_gcs_workdir.py", "test_zipformer.py", "test_remat.py",
               "test_losses_sharded.py", "test_text.py", "test_clsp.py", "test_distributed.py"]


def pytest_configure(config):
    # Set once by the controlling process; xdist workers inherit it.
    if not os.environ.get(XLA_CACHE_ENV):
        config._clsp_xla_cache = os.environ[XLA_CACHE_ENV] = tempfile.mkdtemp(prefix="clsp_jax_test_xla_")


def pytest_unconfigure(config):
    created = getattr(config, "_clsp_xla_cache", None)
    if created:
        shutil.rmtree(created, ignore_errors=True)
        os.environ.pop(XLA_CACHE_ENV, None)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(path, model): `eval_fixtures.tiny_clsp()` saved, and loaded as the CLIs load it."""
    return saved_tiny_clsp(tmp_path_factory)


@pytest.fixture
def run(checkpoint, monkeypatch, capsys, request):
    """`run(*argv) -> (exit code, stdout, stderr)` of the requesting module's `cli.main` on `checkpoint`."""
    return cli_runner(request.module.cli.main, checkpoint, monkeypatch, capsys)
