"""benchmarks/gpu.sh: its --dry-run on the CPU (the whole path of the accelerator check, micro network), and
the summary's handling of parts that did not fit or failed."""

import json
import os
import subprocess
import sys

import pytest

from train_fixtures import ROOT

from benchmarks import gpu_report


@pytest.mark.slow  # three train-step compilations and the embedding in four processes (about a minute)
def test_gpu_sh_dry_run_writes_every_figure(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", str(tmp_path)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    r = json.load(open(tmp_path / "gpu.json"))
    assert r["dry_run"] and r["machine"]["platform"] == "cpu"
    assert [row["remat"] for row in r["summary"]] == list(gpu_report.POLICIES)
    for policy, step in r["train_step"].items():
        assert step["config"]["remat"] == policy and step["config"]["compute_dtype"] == "bfloat16"
        assert step["compile_s"] > 0 and step["step"]["median_s"] > 0
        assert step["samples_per_s"] > 0 and step["audio_seconds_per_s"] == pytest.approx(step["samples_per_s"])
        assert step["peak"]["dtype"] == "bfloat16" and step["peak"]["flops_per_s"] > 0
        assert 0 < step["mfu_xla"] < 1
        assert step["memory_per_device"]["temp_size_in_bytes"] > 0 and step["memory_seen"]["process_max_rss_bytes"] > 0
    embed = r["embed"]
    assert embed["audio"]["clip_seconds"] == 10 and embed["audio"]["clips_per_s"] > 0
    assert embed["audio"]["audio_seconds_per_s"] == pytest.approx(10 * embed["audio"]["clips_per_s"])
    assert embed["text"]["captions_per_s"] > 0


def _step_part(policy: str) -> dict:
    return {"machine": {"platform": "gpu"}, "config": {"remat": policy}, "compile_s": 30.0,
            "step": {"median_s": 0.5}, "samples_per_s": 80.0, "audio_seconds_per_s": 800.0, "mfu_xla": 0.4,
            "memory_per_device": {"temp_size_in_bytes": 2**33}, "memory_seen": {"device_peak_bytes_in_use": 2**34}}


def _write(parts, name, status, result=None, log=""):
    (parts / f"{name}.status").write_text(f"{status}\n")
    (parts / f"{name}.log").write_text(log)
    if result is not None:
        (parts / f"{name}.json").write_text(json.dumps(result))


def test_gpu_report_records_what_did_not_fit_and_fails_a_dry_run_on_any_failure(tmp_path, capsys):
    parts = tmp_path / "parts"
    parts.mkdir()
    _write(parts, "step_none", 1, log="...\njaxlib.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory allocating\n")
    _write(parts, "step_layer", 0, _step_part("layer"))
    _write(parts, "step_layer_save_dots", 124, log="compiling\n")
    _write(parts, "embed", 0, {"machine": {}, "audio": {"clips_per_s": 40.0, "clip_seconds": 10,
                                                        "audio_seconds_per_s": 400.0},
                               "text": {"captions_per_s": 900.0, "text_length": 128}})
    out = tmp_path / "gpu.json"
    assert gpu_report.main([str(parts), str(out)]) == 0  # a device run: one policy fits, that is a result
    r = json.load(open(out))
    assert r["machine"] == {"platform": "gpu"}
    assert r["summary"][0] == {"remat": "none", "result": "out of memory"}
    assert r["summary"][1] == {"remat": "layer", "compile_s": 30.0, "step_s": 0.5, "clips_per_s": 80.0,
                               "audio_seconds_per_s": 800.0, "mfu_xla": 0.4, "xla_temp_gib": 8.0, "peak_seen_gib": 16.0}
    assert r["summary"][2] == {"remat": "layer_save_dots", "result": "timed out"}
    assert r["train_step"]["none"]["log_tail"][-1].startswith("jaxlib.XlaRuntimeError")
    assert "embedding: 40.00 clips/s of 10 s (400.0 audio-s/s), 900.0 captions/s of 128 tokens" in capsys.readouterr().out
    # The same parts in a dry run: any failure there is a bug.
    assert gpu_report.main([str(parts), str(out), "--dry-run=1"]) == 1
    assert "failed parts: none, layer_save_dots" in capsys.readouterr().err
