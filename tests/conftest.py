"""Fixtures shared by the CLI tests (test_embed.py, test_eval_cli.py): a saved tiny CLSP and an in-process
runner of the test module's `cli.main`."""

import pytest

from eval_fixtures import cli_runner, saved_tiny_clsp


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(path, model): `eval_fixtures.tiny_clsp()` saved, and loaded as the CLIs load it."""
    return saved_tiny_clsp(tmp_path_factory)


@pytest.fixture
def run(checkpoint, monkeypatch, capsys, request):
    """`run(*argv) -> (exit code, stdout, stderr)` of the requesting module's `cli.main` on `checkpoint`."""
    return cli_runner(request.module.cli.main, checkpoint, monkeypatch, capsys)
