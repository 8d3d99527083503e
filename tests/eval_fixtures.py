"""A tiny CLSP for evaluation tests (fast to build, MiniLM tokenizer), a saved copy with an in-process CLI runner,
and a helper to embed like the evaluators."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from clsp_jax import CLSP
from train_fixtures import MINILM

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = Path(MINILM)  # the running interpreter's copy, whichever venv and Python version
FIXTURE = REPO / "tests/fixtures/clsp_spear_tiny.npz"


def tiny_clsp() -> CLSP:
    """The reference fixture network (SPEAR topology, width 64) with a MiniLM-sized random word and position
    table, so the MiniLM tokenizer's ids fit; loading fixture weights is much faster than random init."""
    data = np.load(FIXTURE)
    config = json.loads(str(data["config"]))
    config["text"].update(vocab_size=30522, max_position_embeddings=514, pad_token_id=0)
    state = {k[len("state_dict/"):]: data[k] for k in data.files if k.startswith("state_dict/")}
    rng = np.random.default_rng(0)
    state["text_encoder.embeddings.word_embeddings.weight"] = rng.normal(0, 0.5, (30522, 64)).astype(np.float32)
    state["text_encoder.embeddings.position_embeddings.weight"] = rng.normal(0, 0.5, (514, 64)).astype(np.float32)
    return CLSP.from_torch(state, config, tokenizer=str(TOKENIZER))


def saved_tiny_clsp(tmp_path_factory) -> tuple[Path, CLSP]:
    """`tiny_clsp()` saved to a temporary dir: (its path, the model as `CLSP.load` returns it)."""
    path = tmp_path_factory.mktemp("ckpt") / "clsp"
    tiny_clsp().save(path)
    return path, CLSP.load(path)


def cli_runner(main, checkpoint: tuple[Path, CLSP], monkeypatch, capsys):
    """`call(*argv) -> (exit code, stdout, stderr)` of `main(["--checkpoint", path, *argv])`, in process.

    `CLSP.load` of the checkpoint returns the already loaded model, so the runs share compiled programs
    (loading itself is exercised by `saved_tiny_clsp`)."""
    path, model = checkpoint
    real_load = CLSP.load
    monkeypatch.setattr(CLSP, "load", lambda d: model if str(d) == str(path) else real_load(d))

    def call(*argv):
        rc = main(["--checkpoint", str(path), *map(str, argv)])
        out, err = capsys.readouterr()
        return rc, out, err

    return call


def embed_in_eights(model: CLSP, waves: list[np.ndarray]) -> np.ndarray:
    """model.embed_audio in calls of 8 rows (the tests' eval batch size: the same compiled program)."""
    out = []
    for start in range(0, len(waves), 8):
        chunk = list(waves[start:start + 8])
        out.append(model.embed_audio(chunk + [chunk[-1]] * (8 - len(chunk)))[: len(chunk)])
    return np.concatenate(out)
