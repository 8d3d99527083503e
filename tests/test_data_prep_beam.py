"""data_prep.prepare --beam: the Beam pipeline (DirectRunner) builds the same dataset as the local path.

Needs the optional extra ``beam`` (apache-beam); skipped where it is not installed.
"""

from __future__ import annotations

import pytest

import fcaps_fixtures as ff
from clsp_jax.data import fcaps_format
from data_prep.prepare import BuildSettings, prepare

pytest.importorskip("apache_beam")


def _shards(data_dir):
    bdir = fcaps_format.builder_dir(data_dir)
    return {p.name: p.read_bytes() for p in fcaps_format.split_shard_files(bdir, "fcaps", "train")}


@pytest.mark.parametrize("workers", [1, 2])  # in-memory and multi-processing DirectRunner
def test_beam_build_equals_local_build(tmp_path, workers):
    manifest, audio_root, _ = ff.make_corpus(tmp_path / "src", 7, max_s=4.0)
    (audio_root / "c0002.wav").write_text("broken")
    settings = BuildSettings(str(audio_root))
    local = prepare([manifest], split="train", data_dir=tmp_path / "local", settings=settings, clips_per_shard=2)
    beam = prepare([manifest], split="train", data_dir=tmp_path / "beam", settings=settings, clips_per_shard=2,
                   beam=True, workers=workers)
    assert beam == local
    assert local["accepted"] == 6 and local["rejected_by_reason"] == {"decode_error": 1}
    assert _shards(tmp_path / "beam") == _shards(tmp_path / "local") and len(_shards(tmp_path / "local")) == 4
    rejects = fcaps_format.reports_dir(fcaps_format.builder_dir(tmp_path / "beam"), "train") / "rejects.jsonl"
    assert '"id": "clip0002", "reason": "decode_error"' in rejects.read_text()
