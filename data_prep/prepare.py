"""Build an FCaps TFDS split (ArrayRecord, no TensorFlow) from Lhotse MonoCut manifests + audio.

    python -m data_prep.prepare --manifest cuts_a.jsonl.gz [--manifest cuts_b.jsonl ...] \\
        --split train --audio-root /data/audio --data-dir /data/tfds [--workers 8] [--beam]

Three resumable stages, all state under ``<data-dir>/<name>/_work/<split>/``:

1. **plan**: read the manifests in order, reject lines that are not UTF-8 / not JSON / have no id,
   reject repeated ids (the first occurrence wins), and cut the rest into work units of
   ``--clips-per-shard`` clips (``units/unit-NNNNN.jsonl``). ``plan.json`` is written last, so a
   plan either exists completely or is redone.
2. **process** each unit not yet done (sequentially, in ``--workers`` processes, or as an Apache
   Beam pipeline with ``--beam``): parse, filter, decode, resample each clip, write one ArrayRecord
   shard to a temporary name, rename it, then write ``done/unit-NNNNN.json`` (counts, rejects,
   sample counts). A killed run leaves at most temporary files; units are pure functions of their
   input, so redoing one (also a Beam retry) writes identical bytes.
3. **finalize**: hard-link the non-empty shards into the TFDS directory with their final names,
   write the ``num_samples`` sidecar, ``reports/<split>/rejects.jsonl`` (every rejected clip: id,
   reason, detail, manifest, line) and ``summary.json``, update ``dataset_info.json`` (other splits
   are kept), then delete the work directory.

Audio sources are paths relative to ``--audio-root`` (or absolute), or tar members written
``<archive>.tar//<member>`` (see ``clsp_jax.data.manifests``).

Re-running the same command after an interruption resumes; the result equals an uninterrupted
build byte for byte. Re-running with different arguments over an unfinished build is refused.
Filters (defaults are the authors'): duration in [--min-duration, --max-duration] s; fine-grained
captions 128-768 characters without newlines or negations, global captions >= 32 characters (see
``clsp_jax.data.manifests.select_captions``). Audio of any rate or channel count is resampled to 16 kHz
mono (the cut's channel; several channels are averaged).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import sys
import traceback
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from clsp_jax import cli
from clsp_jax.data import fcaps_format
from clsp_jax.data.manifests import CaptionRules, ClipRejected, iter_manifest, load_clip, parse_cut, select_captions

log = logging.getLogger("data_prep.prepare")

# Fault injection for the resume tests: the process SIGKILLs itself after this many clips.
KILL_AFTER_CLIPS_ENV = "CLSP_DATA_PREP_KILL_AFTER_CLIPS"
_clips_processed = 0


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    """Everything that decides the content of a shard (part of the plan's fingerprint)."""

    audio_root: str
    min_duration: float = 2.0
    max_duration: float = 30.0
    rules: CaptionRules = CaptionRules()


@dataclasses.dataclass(frozen=True)
class WorkDir:
    root: Path

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def plan_rejects(self) -> Path:
        return self.root / "plan_rejects.jsonl"

    def unit(self, i: int) -> Path:
        return self.root / "units" / f"unit-{i:05d}.jsonl"

    def shard(self, i: int) -> Path:
        return self.root / "shards" / f"unit-{i:05d}.array_record"

    def done(self, i: int) -> Path:
        return self.root / "done" / f"unit-{i:05d}.json"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _reject_entry(rejected: ClipRejected, clip_id: str, manifest: str, line: int) -> dict:
    return {"id": clip_id, "reason": rejected.reason, "detail": rejected.detail, "manifest": manifest, "line": line}


# ---------------------------------------------------------------------------------------- plan


def plan_units(manifests: list[Path], work: WorkDir, clips_per_shard: int, fingerprint: dict) -> int:
    """Stage 1: splits the manifests into work units; returns the number of units."""
    if work.plan.exists():
        plan = json.loads(work.plan.read_text())
        if plan["fingerprint"] != fingerprint:
            raise ValueError(
                f"{work.root} holds an unfinished build with different arguments or manifests; "
                "re-run with the original arguments, or delete that directory to start over"
            )
        return plan["num_units"]
    if work.root.exists():  # a plan that never finished: redo it from scratch
        shutil.rmtree(work.root)
    for sub in ("units", "shards", "done"):
        (work.root / sub).mkdir(parents=True)

    seen: set[str] = set()
    rejects = []
    num_units = 0
    pending: list[str] = []

    def flush():
        nonlocal num_units
        work.unit(num_units).write_text("".join(pending))
        num_units += 1
        pending.clear()

    for manifest in manifests:
        for line, record in iter_manifest(manifest):
            if isinstance(record, ClipRejected):
                rejects.append(_reject_entry(record, f"{manifest}:{line}", str(manifest), line))
                continue
            if record["id"] in seen:
                dup = ClipRejected("duplicate_id", "an earlier line has the same id")
                rejects.append(_reject_entry(dup, record["id"], str(manifest), line))
                continue
            seen.add(record["id"])
            pending.append(json.dumps({"manifest": str(manifest), "line": line, "cut": record}) + "\n")
            if len(pending) == clips_per_shard:
                flush()
    if pending:
        flush()
    work.plan_rejects.write_text("".join(json.dumps(r) + "\n" for r in rejects))
    _atomic_write_text(work.plan, json.dumps({"fingerprint": fingerprint, "num_units": num_units}))
    log.info("planned %d clips in %d units (%d manifest lines rejected)", len(seen), num_units, len(rejects))
    return num_units


# ------------------------------------------------------------------------------------- process


def process_clip(cut: dict[str, Any], settings: BuildSettings) -> dict[str, Any]:
    """One manifest record -> one TFDS example (see fcaps_format.features); raises ClipRejected."""
    clip = parse_cut(cut)
    _check_duration(clip.duration, settings, "manifest")
    clip = select_captions(clip, settings.rules)
    waveform = load_clip(clip, settings.audio_root)
    num_samples = int(waveform.shape[0])
    duration = num_samples / fcaps_format.SAMPLE_RATE
    _check_duration(duration, settings, "decoded")
    return {
        "id": clip.id,
        "waveform": fcaps_format.to_int16(waveform),
        "num_samples": num_samples,
        "duration": duration,
        "global_captions": list(clip.global_captions),
        "finegrained_captions": list(clip.finegrained_captions),
        "tags": {
            "accent": clip.accent,
            "pitch": clip.pitch,
            "speaking_rate": clip.speaking_rate,
            "gender": clip.gender,
            "intrinsic_tags": list(clip.intrinsic_tags),
            "situational_tags": list(clip.situational_tags),
        },
        "speaker": clip.speaker,
    }


def _check_duration(duration: float, settings: BuildSettings, what: str) -> None:
    if duration < settings.min_duration:
        raise ClipRejected("too_short", f"{what} duration {duration:.3f} s < {settings.min_duration} s")
    if duration > settings.max_duration:
        raise ClipRejected("too_long", f"{what} duration {duration:.3f} s > {settings.max_duration} s")


def _maybe_inject_fault() -> None:
    global _clips_processed
    _clips_processed += 1
    limit = os.environ.get(KILL_AFTER_CLIPS_ENV)
    if limit and _clips_processed >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)


def process_unit(work_root: str, index: int, settings: BuildSettings) -> dict:
    """Stage 2 for one unit: writes its shard and done file; returns the done record."""
    from tensorflow_datasets.core import file_adapters

    work = WorkDir(Path(work_root))
    serialize = fcaps_format.ExampleSerializer()
    serialized, num_samples, rejects = [], [], []
    for raw in work.unit(index).read_text().splitlines():
        entry = json.loads(raw)
        cut = entry["cut"]
        try:
            example = process_clip(cut, settings)
            serialized.append(serialize(example))
            num_samples.append(example["num_samples"])
        except ClipRejected as e:
            rejects.append(_reject_entry(e, cut["id"], entry["manifest"], entry["line"]))
        except Exception as e:  # a bug or an odd file must not stop the build; it is reported
            detail = "".join(traceback.format_exception_only(e)).strip()
            error = ClipRejected("unexpected_error", detail)
            rejects.append(_reject_entry(error, cut["id"], entry["manifest"], entry["line"]))
            log.warning("clip %s: unexpected error %s", cut["id"], detail)
        _maybe_inject_fault()

    shard = work.shard(index)
    tmp = shard.with_name(f"{shard.name}.tmp-{os.getpid()}")
    file_adapters.ArrayRecordFileAdapter.write_examples(tmp, ((None, s) for s in serialized))
    os.replace(tmp, shard)
    done = {
        "num_examples": len(serialized),
        "num_bytes": sum(len(s) for s in serialized),
        "num_samples": num_samples,
        "rejects": rejects,
    }
    _atomic_write_text(work.done(index), json.dumps(done))
    return done


def _run_inline(work: WorkDir, pending: list[int], settings: BuildSettings) -> None:
    for n, i in enumerate(pending, 1):
        process_unit(str(work.root), i, settings)
        log.info("unit %d done (%d/%d)", i, n, len(pending))


def _run_pool(work: WorkDir, pending: list[int], settings: BuildSettings, workers: int) -> None:
    # spawn: workers start clean (no inherited threads or locks from TFDS/ArrayRecord).
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = {pool.submit(process_unit, str(work.root), i, settings): i for i in pending}
        for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
            future.result()  # re-raises BrokenProcessPool if a worker died
            log.info("unit %d done (%d/%d)", futures[future], n, len(pending))


def _run_beam(work: WorkDir, pending: list[int], settings: BuildSettings, workers: int) -> None:
    """The same per-unit code as an Apache Beam pipeline (DirectRunner here; any runner whose
    workers see ``work.root`` works). Units are idempotent, so Beam's retries are safe."""
    try:
        import apache_beam as beam
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError as e:
        raise ValueError("--beam needs apache-beam: pip install 'clsp-jax[beam]'") from e

    options = PipelineOptions(
        runner="DirectRunner",
        direct_num_workers=workers,
        direct_running_mode="multi_processing" if workers > 1 else "in_memory",
    )
    with beam.Pipeline(options=options) as pipeline:
        _ = (
            pipeline
            | "units" >> beam.Create(pending)
            | "spread" >> beam.Reshuffle()
            | "process" >> beam.Map(_beam_process_unit, str(work.root), settings)
        )


def _beam_process_unit(index: int, work_root: str, settings: BuildSettings) -> int:
    process_unit(work_root, index, settings)
    return index


# ------------------------------------------------------------------------------------ finalize


def finalize(work: WorkDir, num_units: int, name: str, split: str, bdir: Path, settings: BuildSettings) -> dict:
    """Stage 3: publishes the split; idempotent (a crash here is fixed by re-running)."""
    dones = [json.loads(work.done(i).read_text()) for i in range(num_units)]
    rejects = [json.loads(l) for l in work.plan_rejects.read_text().splitlines()]
    rejects += [r for d in dones for r in d["rejects"]]
    kept = [i for i, d in enumerate(dones) if d["num_examples"] > 0]
    num_samples = np.asarray([n for d in dones for n in d["num_samples"]], dtype=np.int32)
    reasons = collections.Counter(r["reason"] for r in rejects)
    summary = {
        "name": name,
        "split": split,
        "accepted": int(num_samples.size),
        "rejected": len(rejects),
        "accepted_hours": float(num_samples.sum(dtype=np.int64)) / fcaps_format.SAMPLE_RATE / 3600.0,
        "rejected_by_reason": dict(sorted(reasons.items())),
        # The duration filter's bounds: clips outside them are the too_short / too_long rejects.
        "duration_range_s": [settings.min_duration, settings.max_duration],
        "num_shards": len(kept),
    }
    reports = fcaps_format.reports_dir(bdir, split)
    reports.mkdir(parents=True, exist_ok=True)
    with fcaps_format.metadata_lock(bdir):
        for old in fcaps_format.split_shard_files(bdir, name, split):
            old.unlink()
        for j, i in enumerate(kept):
            _link_or_copy(work.shard(i), bdir / fcaps_format.shard_name(name, split, j, len(kept)))
        _atomic_write_text(reports / "rejects.jsonl", "".join(json.dumps(r) + "\n" for r in rejects))
        _atomic_write_text(reports / "summary.json", json.dumps(summary, indent=1) + "\n")
        splits = fcaps_format.existing_splits(bdir)
        splits.pop(split, None)
        sidecar = fcaps_format.num_samples_path(bdir, name, split)
        sidecar.unlink(missing_ok=True)
        if kept:
            np.save(sidecar, num_samples)
            splits[split] = {
                "shardLengths": [dones[i]["num_examples"] for i in kept],
                "numBytes": sum(dones[i]["num_bytes"] for i in kept),
            }
        if splits:
            fcaps_format.write_metadata(bdir, name, splits)
    shutil.rmtree(work.root)
    return summary


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copyfile(src, dst)


# ----------------------------------------------------------------------------------------- CLI


def prepare(
    manifests: Iterable[str | Path],
    *,
    split: str,
    data_dir: str | Path,
    settings: BuildSettings,
    name: str = fcaps_format.DEFAULT_NAME,
    workers: int = 1,
    clips_per_shard: int = 1000,
    beam: bool = False,
    overwrite: bool = False,
) -> dict:
    """Builds (or resumes building) one split; returns the summary dict (also in summary.json)."""
    manifests = [Path(m).resolve() for m in manifests]
    for m in manifests:
        if not m.is_file():
            raise ValueError(f"manifest {m} does not exist")
    if not re.fullmatch(r"[\w-]+", split) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"split {split!r} must match [\\w-]+ and name {name!r} [a-z][a-z0-9_]* (TFDS names)")
    if clips_per_shard < 1 or workers < 1:
        raise ValueError("--clips-per-shard and --workers must be >= 1")
    bdir = fcaps_format.builder_dir(data_dir, name)
    work = WorkDir(Path(data_dir) / name / "_work" / split)
    if not work.root.exists() and split in fcaps_format.existing_splits(bdir) and not overwrite:
        raise ValueError(f"split {split!r} already exists in {bdir}; pass --overwrite to rebuild it")

    fingerprint = {
        "manifests": [[str(m), m.stat().st_size, m.stat().st_mtime_ns] for m in manifests],
        "clips_per_shard": clips_per_shard,
        "settings": json.loads(json.dumps(dataclasses.asdict(settings))),
        "name": name,
        "split": split,
    }
    num_units = plan_units(manifests, work, clips_per_shard, fingerprint)
    pending = [i for i in range(num_units) if not work.done(i).exists()]
    log.info("%d of %d units to process", len(pending), num_units)
    if pending:
        if beam:
            _run_beam(work, pending, settings, workers)
        elif workers == 1:
            _run_inline(work, pending, settings)
        else:
            _run_pool(work, pending, settings, workers)
    return finalize(work, num_units, name, split, bdir, settings)


def format_summary(summary: dict, bdir: Path) -> str:
    """The report printed after a build: counts, then rejected clips by reason. The duration filter's two
    reasons are always listed with their bounds (clips longer than the training buckets are dropped here)."""
    lines = [
        f"{summary['name']}/{summary['split']}: accepted {summary['accepted']} clips "
        f"({summary['accepted_hours']:.3f} h) in {summary['num_shards']} shards; "
        f"rejected {summary['rejected']} clips"
    ]
    low, high = summary["duration_range_s"]
    reasons = {"too_long": 0, "too_short": 0, **summary["rejected_by_reason"]}
    bounds = {"too_long": f" (longer than --max-duration {high:g} s)",
              "too_short": f" (shorter than --min-duration {low:g} s)"}
    lines += [f"  {reason}: {n}{bounds.get(reason, '')}" for reason, n in reasons.items()]
    lines.append(f"  rejects: {fcaps_format.reports_dir(bdir, summary['split']) / 'rejects.jsonl'}")
    return "\n".join(lines)


def _check_args(args) -> None:
    """Raises ValueError for arguments that would only fail (or reject every clip) after planning."""
    if not Path(args.audio_root).is_dir():
        raise ValueError(f"--audio-root {args.audio_root} is not a directory")
    if Path(args.data_dir).exists() and not Path(args.data_dir).is_dir():
        raise ValueError(f"--data-dir {args.data_dir} is a file")
    if not 0 <= args.min_duration <= args.max_duration < float("inf"):
        raise ValueError(f"need 0 <= --min-duration <= --max-duration (finite), got {args.min_duration} and "
                         f"{args.max_duration}")
    if not 0 <= args.min_caption_chars <= args.max_caption_chars or args.min_global_caption_chars < 0:
        raise ValueError("caption lengths must be >= 0 with --min-caption-chars <= --max-caption-chars")


def main(argv: list[str] | None = None) -> int:
    """The CLI (see the module doc); returns the exit code: 2 for bad arguments, 1 when the build failed
    (a worker died, the disk or a permission failed: re-running resumes) or accepted no clip."""
    p = cli.ArgumentParser(prog="python -m data_prep.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", action="append", required=True, help="MonoCut .jsonl or .jsonl.gz (repeatable)")
    p.add_argument("--split", required=True)
    p.add_argument("--audio-root", required=True, help="relative audio paths are resolved against this")
    p.add_argument("--data-dir", required=True, help="TFDS data dir (the dataset goes to <dir>/<name>/1.0.0)")
    p.add_argument("--name", default=fcaps_format.DEFAULT_NAME)
    p.add_argument("--workers", type=int, default=1, help="processes (1: in this process)")
    p.add_argument("--clips-per-shard", type=int, default=1000)
    p.add_argument("--min-duration", type=float, default=2.0, help="seconds")
    p.add_argument("--max-duration", type=float, default=30.0, help="seconds")
    p.add_argument("--min-caption-chars", type=int, default=128, help="fine-grained captions")
    p.add_argument("--max-caption-chars", type=int, default=768, help="fine-grained captions")
    p.add_argument("--min-global-caption-chars", type=int, default=32)
    p.add_argument("--beam", action="store_true", help="run the units as an Apache Beam pipeline")
    p.add_argument("--overwrite", action="store_true", help="rebuild a split that already exists")
    try:
        args = p.parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        _check_args(args)
        settings = BuildSettings(
            audio_root=str(Path(args.audio_root).resolve()),
            min_duration=args.min_duration,
            max_duration=args.max_duration,
            rules=CaptionRules(args.min_caption_chars, args.max_caption_chars, args.min_global_caption_chars),
        )
        summary = prepare(
            args.manifest,
            split=args.split,
            data_dir=args.data_dir,
            settings=settings,
            name=args.name,
            workers=args.workers,
            clips_per_shard=args.clips_per_shard,
            beam=args.beam,
            overwrite=args.overwrite,
        )
    except BrokenProcessPool:
        log.error("a worker process died; finished units are kept: re-run the same command to resume")
        return 1
    except ValueError as e:
        return cli.usage_error("data_prep.prepare", e)
    except OSError as e:  # the disk or a permission, mid-build
        print(f"data_prep.prepare: error: {e}; finished units are kept: re-run the same command to resume",
              file=sys.stderr)
        return 1
    print(format_summary(summary, fcaps_format.builder_dir(args.data_dir, args.name)))
    if summary["accepted"] == 0:
        log.error("no clip was accepted; the split was not registered")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
