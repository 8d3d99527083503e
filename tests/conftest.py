"""Fixtures shared by test modules: the CLI tests' (test_embed.py, test_eval_cli.py) saved tiny CLSP and
in-process runner of the test module's `cli.main`; the GCS emulator of the gs:// tests (`gcs`, `gcs_path`,
one emulator for the session, started on first use)."""

import pytest

from eval_fixtures import cli_runner, saved_tiny_clsp
from gcs_emulator import gcs, gcs_path  # noqa: F401  (pytest fixtures)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(path, model): `eval_fixtures.tiny_clsp()` saved, and loaded as the CLIs load it."""
    return saved_tiny_clsp(tmp_path_factory)


@pytest.fixture
def run(checkpoint, monkeypatch, capsys, request):
    """`run(*argv) -> (exit code, stdout, stderr)` of the requesting module's `cli.main` on `checkpoint`."""
    return cli_runner(request.module.cli.main, checkpoint, monkeypatch, capsys)
