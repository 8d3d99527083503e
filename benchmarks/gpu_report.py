"""The one JSON of `benchmarks/gpu.sh`: its parts (one train_step JSON per remat policy, one embed JSON, each
with its log and exit status) gathered, and a summary printed.

    python -m benchmarks.gpu_report PARTS_DIR OUT_JSON [--dry-run=0|1]

OUT_JSON: {"dry_run", "machine", "train_step": {policy: train_step's result, or {"fits": false, "exit_status",
"log_tail"}}, "embed": embed's result or the same failure record, "summary": one row per policy}.
Exit status 1 when no policy ran or the embedding failed, and in a dry run when any part failed (there a
failure is a bug, not a lack of memory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from benchmarks import common

POLICIES = ("none", "layer", "layer_save_dots")
TIMEOUT_STATUS = 124  # timeout(1)'s exit status


def part(parts: str, name: str) -> dict:
    """The result `name`.json in `parts`, or a failure record from its exit status and log."""
    path = os.path.join(parts, f"{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    with open(os.path.join(parts, f"{name}.status")) as f:
        status = int(f.read().strip() or -1)
    log_path = os.path.join(parts, f"{name}.log")
    tail = open(log_path).read().splitlines()[-20:] if os.path.exists(log_path) else []
    out_of_memory = any("RESOURCE_EXHAUSTED" in line or "out of memory" in line.lower() for line in tail)
    reason = "timed out" if status == TIMEOUT_STATUS else "out of memory" if out_of_memory else "failed"
    return {"fits": False, "reason": reason, "exit_status": status, "log_tail": tail}


def summary_row(policy: str, r: dict) -> dict:
    if r.get("fits") is False:
        return {"remat": policy, "result": r["reason"]}
    mem, seen = r["memory_per_device"], r["memory_seen"]
    return {"remat": policy, "compile_s": round(r["compile_s"], 1), "step_s": round(r["step"]["median_s"], 4),
            "clips_per_s": round(r["samples_per_s"], 2),
            "audio_seconds_per_s": round(r["audio_seconds_per_s"], 1), "mfu_xla": round(r["mfu_xla"], 4),
            "xla_temp_gib": round(mem.get("temp_size_in_bytes", 0) / 2**30, 3),
            "peak_seen_gib": round(max(seen.values()) / 2**30, 3)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("parts")
    p.add_argument("out")
    p.add_argument("--dry-run", type=int, default=0)
    args = p.parse_args(argv)
    steps = {policy: part(args.parts, f"step_{policy}") for policy in POLICIES}
    embed = part(args.parts, "embed")
    ran = [r for r in steps.values() if r.get("fits") is not False]
    machine = (ran[0] if ran else embed).get("machine") or common.machine()
    result = {"dry_run": bool(args.dry_run), "machine": machine, "train_step": steps, "embed": embed,
              "summary": [summary_row(policy, r) for policy, r in steps.items()]}
    common.write_json(args.out, result)
    for row in result["summary"]:
        print("  ".join(f"{k} {v}" for k, v in row.items()))
    if embed.get("fits") is not False:
        a, t = embed["audio"], embed["text"]
        print(f"embedding: {a['clips_per_s']:.2f} clips/s of {a['clip_seconds']:g} s ({a['audio_seconds_per_s']:.1f} "
              f"audio-s/s), {t['captions_per_s']:.1f} captions/s of {t['text_length']} tokens")
    failed = [name for name, r in [*steps.items(), ("embed", embed)] if r.get("fits") is False]
    if not ran or embed.get("fits") is False or (args.dry_run and failed):
        print(f"gpu.sh: failed parts: {', '.join(failed)} (logs in the JSON's log_tail)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
