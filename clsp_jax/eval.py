"""Evaluate a saved CLSP (`CLSP.save` directory): retrieval, zero-shot classification, style similarity.

    python -m clsp_jax.eval --checkpoint DIR --task retrieval --manifest psc_cuts.jsonl.gz --audio-root AUDIO
    python -m clsp_jax.eval --checkpoint DIR --task retrieval --data-dir TFDS_DIR --split test
    python -m clsp_jax.eval --checkpoint DIR --task zeroshot --dataset ravdess --manifest ravdess_cuts.jsonl.gz \
        --audio-root RAVDESS [--label-field emotion|gender|age_bin] [--ensemble max|mean]
    python -m clsp_jax.eval --checkpoint DIR --task similarity --ratings ratings.csv [--audio-root AUDIO]
    python -m clsp_jax.eval --workdir RUN [--step N] [--weights averaged|raw|ema] --task ...
    python -m clsp_jax.eval --check-overlap TRAIN.jsonl.gz [TRAIN2 ...] --manifest EVAL.jsonl.gz \
        [--audio-root AUDIO --train-audio-root TRAIN_AUDIO] [--checkpoint DIR --task ...]
    python -m clsp_jax.eval --checkpoint DIR --task all --psc PSC_CUTS [AUDIO] --ravdess RAVDESS_CUTS [AUDIO] \
        --cremad CREMAD_CUTS [AUDIO] --iemocap IEMOCAP_CUTS [AUDIO] [--ratings ratings.csv] \
        [--check-overlap TRAIN.jsonl.gz ...]

Manifests are Lhotse MonoCut JSONL(.gz) (`python -m data_prep.eval_sets` writes the paper's sets); their audio is
decoded from the files (relative paths against --audio-root, default the manifest's folder) and
resampled to 16 kHz. Retrieval uses the first global and the last fine-grained caption of each clip
(after the authors' caption selection); zero-shot runs the paper's prompts of every task of --dataset
(or the one of --label-field); the ratings CSV format is in clsp_jax.evals.sources.

--check-overlap compares the evaluation manifest with training manifests (clsp_jax.evals.overlap: shared
speakers, recording ids, audio paths, normalised transcripts; audio contents too with --train-audio-root)
and prints one line; results.json carries the block under "overlap" ({"checked": false} without the
flag). Without --checkpoint it only runs the check and writes OUT/overlap.json (OUT default ./eval_overlap).

--workdir evaluates a training run's checkpoint directly (its latest, or --step): by default icefall's running
average of the weights when the run kept one (optim.average_period; the authors evaluate averaged models),
else the raw weights; --weights picks. The report says which weights it evaluated ("weights" in results.json,
a note under the table).

--task all evaluates every set given (each manifest with its audio root, default its folder; --ratings for
style similarity) and writes one report laid out like the paper's tables, the paper's numbers beside ours
where our protocol matches (clsp_jax.evals.report: protocols from the cards `data_prep.eval_sets` writes
beside its manifests; deviations listed); with --check-overlap each set is checked for leakage.

Writes OUT/results.json (metrics, counts, skipped and failed clips) and OUT/results.md (the table, also
printed); OUT defaults to ./eval_<task>. Audio that is missing or cannot be decoded is skipped, counted
and listed. Clips longer than --max-audio-seconds (default 30) are embedded as the mean of windows of at
most that length (`clsp_jax.inference`) and counted. Bad arguments or missing files: a one-line error and
exit code 2.

--data-dir and --out may be `gs://` URLs (read and written through etils.epath); the checkpoint or work dir,
manifests, ratings and audio are local files.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
from etils import epath

from clsp_jax import cli, storage
from clsp_jax.data import fcaps_format
from clsp_jax.data.config import default_config
from clsp_jax.data.pipeline import make_eval_batches
from clsp_jax.evals import evaluators, overlap, sources
from clsp_jax.evals import report as paper_report
from clsp_jax.evals.prompts import ZERO_SHOT_TASKS
from clsp_jax.inference import MAX_AUDIO_SECONDS, max_audio_samples

TASKS = ("retrieval", "zeroshot", "similarity", "all")
DATASETS = ("ravdess", "cremad", "iemocap")
LABEL_FIELDS = ("emotion", "gender", "age_bin")
RETRIEVAL_KINDS = ("global", "finegrained")
ALL_SETS = ("psc", "iemocap", "ravdess", "cremad")  # --task all: the report's order


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m clsp_jax.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a CLSP.save directory (config.json, params/, tokenizer.json)")
    p.add_argument("--workdir", help="instead of --checkpoint: a training run's folder (config.json, "
                                     "tokenizer.json, checkpoints/)")
    p.add_argument("--step", type=int, help="with --workdir: the checkpoint's step (default the latest)")
    p.add_argument("--weights", choices=cli.WEIGHTS,
                   help="with --workdir: which weights (default: averaged when the checkpoint has them, else raw)")
    p.add_argument("--task", choices=TASKS)
    p.add_argument("--check-overlap", nargs="+", metavar="TRAIN_MANIFEST",
                   help="training manifests to check --manifest against for shared speakers, recordings and "
                        "transcripts (alone, without --checkpoint: only the check)")
    p.add_argument("--train-audio-root", help="with --check-overlap: root of the training manifests' audio; "
                                              "then audio contents are compared too")
    p.add_argument("--manifest", help="Lhotse MonoCut manifest (.jsonl or .jsonl.gz)")
    p.add_argument("--data-dir", help="TFDS data dir of a prepared split (retrieval)")
    p.add_argument("--split", help="TFDS split name (with --data-dir)")
    p.add_argument("--name", default=fcaps_format.DEFAULT_NAME, help="TFDS dataset name (with --data-dir)")
    p.add_argument("--audio-root", help="root of relative audio paths (default: the manifest's / CSV's folder)")
    p.add_argument("--dataset", choices=DATASETS, help="zero-shot dataset (selects the paper's tasks)")
    p.add_argument("--label-field", choices=LABEL_FIELDS, help="zero-shot: only the task of this label")
    p.add_argument("--ensemble", choices=evaluators.ENSEMBLES, default="max",
                   help="zero-shot: best prompt wins (max, the authors') or mean prompt embedding per class")
    p.add_argument("--ratings", help="similarity (and all): ratings CSV")
    for name in DATASETS + ("psc",):
        p.add_argument(f"--{name}", nargs="+", metavar="MANIFEST [AUDIO_ROOT]",
                       help=f"all: the {name} set's manifest and audio root (default its folder)")
    p.add_argument("--out", help="output folder (default ./eval_<task>)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-audio-seconds", type=float, default=MAX_AUDIO_SECONDS,
                   help="longer clips are embedded as the mean of windows of at most this length (seconds)")
    return p


def _local(path: str, what: str) -> None:
    if storage.is_remote(path):
        raise ValueError(f"{what} {path}: a local path is needed here (copy it first, e.g. gcloud storage cp -r)")


def _existing_file(path: str, what: str) -> Path:
    _local(path, what)
    if not Path(path).is_file():
        raise ValueError(f"{what} {path} does not exist")
    return Path(path)


def _check_args(args) -> None:
    if args.task == "all":
        _check_all_args(args)
    if args.check_overlap:
        if not args.manifest and args.task != "all":
            raise ValueError("--check-overlap needs --manifest (the evaluation set)")
        for path in [*args.check_overlap, *([args.manifest] if args.manifest else [])]:
            _existing_file(path, "--check-overlap" if path != args.manifest else "--manifest")
        if args.train_audio_root and not Path(args.train_audio_root).is_dir():
            raise ValueError(f"--train-audio-root {args.train_audio_root} does not exist")
        if not args.checkpoint and not args.workdir and not args.task:
            return  # the check alone
    elif args.train_audio_root:
        raise ValueError("--train-audio-root goes with --check-overlap")
    if args.checkpoint and args.workdir:
        raise ValueError("--checkpoint and --workdir exclude each other (an exported CLSP, or a training run)")
    if not args.workdir and (args.step is not None or args.weights):
        raise ValueError("--step and --weights go with --workdir")
    if not (args.checkpoint or args.workdir) or not args.task:
        raise ValueError("--checkpoint (or --workdir) and --task are required (or --check-overlap with --manifest "
                         "alone)")
    if args.workdir:
        _local(args.workdir, "--workdir")
    else:
        _local(args.checkpoint, "--checkpoint")
        if not (Path(args.checkpoint) / "config.json").is_file():
            raise ValueError(f"--checkpoint {args.checkpoint} is not a saved CLSP (no config.json)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    max_audio_samples(args.max_audio_seconds, "--max-audio-seconds")
    if args.task == "all":
        pass  # _check_all_args
    elif args.task == "retrieval":
        if bool(args.manifest) == bool(args.data_dir or args.split):
            raise ValueError("retrieval needs either --manifest or --data-dir with --split")
        if args.manifest:
            _existing_file(args.manifest, "--manifest")
        elif not (args.data_dir and args.split):
            raise ValueError("--data-dir and --split go together")
        elif not epath.Path(args.data_dir).is_dir():
            raise ValueError(f"--data-dir {args.data_dir} does not exist")
    elif args.task == "zeroshot":
        if not args.dataset:
            raise ValueError("zeroshot needs --dataset (ravdess, cremad or iemocap)")
        if not args.manifest:
            raise ValueError("zeroshot needs --manifest (TFDS splits carry no emotion or age labels)")
        _existing_file(args.manifest, "--manifest")
    else:
        if not args.ratings:
            raise ValueError("similarity needs --ratings (a CSV of rated pairs)")
        _existing_file(args.ratings, "--ratings")
    if args.out and not storage.is_remote(args.out) and Path(args.out).is_file():
        raise ValueError(f"--out {args.out} is a file")
    if args.audio_root:
        _local(args.audio_root, "--audio-root")
    if args.audio_root and not Path(args.audio_root).is_dir():
        raise ValueError(f"--audio-root {args.audio_root} does not exist")


def _check_all_args(args) -> None:
    given = [n for n in ALL_SETS if getattr(args, n)]
    if not given and not args.ratings:
        raise ValueError("--task all needs at least one of --psc, --ravdess, --cremad, --iemocap, --ratings")
    if args.manifest or args.data_dir or args.dataset or args.label_field:
        raise ValueError("--task all takes each set as --psc/--ravdess/--cremad/--iemocap MANIFEST [AUDIO_ROOT]")
    for name in given:
        paths = getattr(args, name)
        if len(paths) > 2:
            raise ValueError(f"--{name} takes a manifest and at most one audio root, got {len(paths)} paths")
        _existing_file(paths[0], f"--{name}")
        if len(paths) == 2 and not Path(paths[1]).is_dir():
            raise ValueError(f"--{name} audio root {paths[1]} does not exist")
    if args.ratings:
        _existing_file(args.ratings, "--ratings")


def _zero_shot_task_names(dataset: str, label_field: str | None) -> list[str]:
    names = [name for name, (key, _) in ZERO_SHOT_TASKS.items()
             if name.startswith(dataset + "_") and label_field in (None, key)]
    if not names:
        raise ValueError(f"{dataset} has no {label_field} task; its labels are "
                         f"{[k for n, (k, _) in ZERO_SHOT_TASKS.items() if n.startswith(dataset + '_')]}")
    return names


def _embed_fns(model, max_seconds: float, report: dict) -> tuple[evaluators.EmbedFn, evaluators.EmbedFn]:
    """The model's embedding functions, clips longer than `max_seconds` embedded in windows and counted in
    report["num_windowed"] (beside report["max_audio_seconds"])."""
    limit = max_audio_samples(max_seconds)
    report.update(max_audio_seconds=max_seconds, num_windowed=0)

    def embed_audio(batch):
        report["num_windowed"] += int(np.sum(batch["valid"] & (batch["audio_lens"] > limit)))
        return model.embed_audio(batch["audio"], batch["audio_lens"], max_seconds=max_seconds)

    return embed_audio, evaluators.model_embed_fns(model)[1]


def _evaluate(args, model) -> tuple[dict, dict]:
    """-> (metrics, report of the inputs: counts, skipped lines, failed clips, clips embedded in windows)."""
    report = {}
    embed = _embed_fns(model, args.max_audio_seconds, report)
    tokenizer = model.tokenizer
    if args.task == "retrieval" and args.data_dir:
        cfg = default_config()
        cfg.eval_caption_kinds = RETRIEVAL_KINDS
        batches = make_eval_batches(cfg, data_dir=args.data_dir, tokenizer=tokenizer, split=args.split,
                                    name=args.name, batch_size=args.batch_size, process_index=0, process_count=1)
        report["num_clips"] = batches.num_clips
        return evaluators.RetrievalEvaluator(batches, RETRIEVAL_KINDS).run(*embed), report
    if args.task == "similarity":
        try:
            clips, pairs = sources.read_ratings(args.ratings, args.audio_root)
        except UnicodeDecodeError:
            raise ValueError(f"--ratings {args.ratings} is not UTF-8 text") from None
        batches = sources.WaveformBatches(clips, args.batch_size)
        report.update(num_clips=len(clips), num_pairs=len(pairs))
        metrics = evaluators.SimilarityEvaluator(batches, pairs, tokenizer).run(*embed)
    else:
        manifest = Path(args.manifest)
        kinds = RETRIEVAL_KINDS if args.task == "retrieval" else ()
        read = sources.read_manifest(manifest, args.audio_root or manifest.parent, kinds)
        if not read.clips:
            raise ValueError(f"--manifest {manifest} has no usable cut ("
                             + (", ".join(f"{r} {n}" for r, n in sorted(read.skipped.items())) or "no lines") + ")")
        report.update(num_clips=len(read.clips), skipped=dict(read.skipped))
        batches = sources.WaveformBatches(read.clips, args.batch_size, tokenizer=tokenizer, kinds=kinds)
        if args.task == "retrieval":
            metrics = evaluators.RetrievalEvaluator(batches, kinds).run(*embed)
        else:
            tasks = {}
            for name in _zero_shot_task_names(args.dataset, args.label_field):
                key = ZERO_SHOT_TASKS[name][0]
                tasks[name] = evaluators.paper_task(name, [sources.cut_label(r, key) for r in read.records])
            metrics = evaluators.ZeroShotEvaluator(batches, tasks, tokenizer, ensemble=args.ensemble).run(*embed)
    report.update(num_failed=len(batches.failures), failed=batches.failures, truncated=sorted(batches.truncated))
    return metrics, report


def _pct(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _num(x, digits=3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(task: str, metrics: dict, report: dict) -> str:
    """The results table (R@k, mAP, WA, UA in percent) and a line on skipped / failed inputs."""
    if task == "retrieval":
        rows = [[kind, d, *(_pct(metrics.get(f"{kind}/{d}/{m}")) for m in ("R@1", "R@5", "R@10", "mAP@10")),
                 _num(metrics.get(f"{kind}/{d}/mean_rank"), 1), _num(metrics.get(f"{kind}/{d}/median_rank"), 1),
                 str(metrics[f"{kind}/num_clips"])]
                for kind in RETRIEVAL_KINDS for d in ("s2t", "t2s")]
        lines = _table(["captions", "direction", "R@1", "R@5", "R@10", "mAP@10", "mean rank", "median rank",
                        "clips"], rows)
    elif task == "zeroshot":
        names = sorted({k.split("/")[0] for k in metrics})
        lines = _table(["task", "WA", "UA", "clips"],
                       [[n, _pct(metrics.get(f"{n}/WA")), _pct(metrics.get(f"{n}/UA")),
                         str(metrics[f"{n}/num_clips"])] for n in names])
        lines += [""] + _table(["task", "class", "recall"],
                               [[k.split("/")[0], k.split("/", 2)[2], _pct(v)]
                                for k, v in metrics.items() if k.split("/")[1] == "recall"])
    else:
        groups = [k.split("/")[0] for k in metrics if k.endswith("/num_pairs")]
        lines = _table(["ratings", "Pearson r", "Spearman rho", "Kendall tau", "pairs"],
                       [[g, *(_num(metrics.get(f"{g}/{m}")) for m in ("pearson", "spearman", "kendall")),
                         str(metrics[f"{g}/num_pairs"])] for g in groups])
    reasons = collections.Counter(r.split(":")[0] for r in report.get("failed", {}).values())
    notes = [f"{report.get('num_clips', '?')} clips"]
    if report.get("skipped"):
        notes.append("skipped manifest lines: " + ", ".join(f"{r} {n}" for r, n in sorted(report["skipped"].items())))
    if reasons:
        notes.append("audio failed: " + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())))
    if report.get("truncated"):
        notes.append(f"truncated to their padded length: {len(report['truncated'])}")
    if report.get("num_windowed"):
        notes.append(f"longer than {report['max_audio_seconds']:g} s, embedded in windows: {report['num_windowed']}")
    if task == "similarity":
        notes.append(f"pairs skipped (failed audio): {metrics['num_pairs_skipped']}")
    weights = report.get("weights", {})
    if weights.get("source") == "workdir":
        notes.append(f"{weights['weights']} weights of step {weights['step']} of {weights['path']}"
                     + (" (the checkpoint has no averaged weights)" if "averaged_unavailable" in weights else ""))
    return "\n".join(lines + ["", "; ".join(notes)]) + "\n"


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _evaluated(task: str, metrics: dict) -> int:
    suffix = "/num_pairs" if task == "similarity" else "/num_clips"
    return max((v for k, v in metrics.items() if k.endswith(suffix)), default=0)


def _setup_logging() -> None:
    # force: absl (imported by grain/tfds) has already put its handler on the root logger. Progress and
    # skipped clips are INFO/WARNING of our loggers; the libraries' INFO chatter (Orbax) stays hidden.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    logging.getLogger("clsp_jax").setLevel(logging.INFO)


def _check_overlap(args) -> dict:
    """The leakage check's report block ({"checked": False} without --check-overlap); prints its line."""
    if not args.check_overlap:
        return {"checked": False}
    eval_root = (args.audio_root or Path(args.manifest).parent) if args.train_audio_root else None
    found, unreadable = overlap.check_manifests(args.check_overlap, args.manifest,
                                                train_audio_root=args.train_audio_root, eval_audio_root=eval_root)
    block = overlap.overlap_summary(found, train_manifests=args.check_overlap, eval_manifest=args.manifest)
    block["unreadable_lines"] = unreadable
    print(overlap.summary_line(block), flush=True)
    return block


def main(argv: list[str] | None = None) -> int:
    """The CLI (see the module doc); returns the exit code."""
    try:
        args = _parser().parse_args(argv)
        _check_args(args)
        overlap_block = _check_overlap(args) if args.task != "all" else None
        if not args.checkpoint and not args.workdir:
            out = epath.Path(args.out or "eval_overlap")
            out.mkdir(parents=True, exist_ok=True)
            (out / "overlap.json").write_text(json.dumps(overlap_block, indent=2) + "\n")
            print(f"wrote {out / 'overlap.json'}")
            return 0
        if args.task == "zeroshot":
            _zero_shot_task_names(args.dataset, args.label_field)
        if args.workdir:
            model, weights = cli.load_run(args.workdir, args.step, args.weights)
        else:
            model, weights = cli.load_model(args.checkpoint), {"source": "checkpoint",
                                                               "path": os.path.abspath(args.checkpoint)}
        if model.tokenizer is None:
            raise ValueError(f"{'--workdir' if args.workdir else '--checkpoint'} "
                             f"{args.workdir or args.checkpoint} has no tokenizer.json")
        if args.task == "all":
            _write_report(args, _evaluate_all(args, model), weights)
            return 0
        metrics, report = _evaluate(args, model)
        report["overlap"] = overlap_block
        report["weights"] = weights
        if not _evaluated(args.task, metrics):
            raise ValueError(f"no clip could be evaluated ({report.get('num_failed', 0)} of "
                             f"{report.get('num_clips', 0)} failed to load; see the warnings above)")
        _write_results(args, metrics, report)
    except (ValueError, OSError) as e:
        return cli.usage_error("clsp_jax.eval", e)
    return 0


def _card(manifest: str) -> dict | None:
    """The card data_prep.eval_sets wrote beside `manifest` (<name>_<protocol>_card.json), or None."""
    path = Path(manifest)
    stem = path.name.split(".jsonl")[0]
    card = path.with_name((stem[: -len("_cuts")] if stem.endswith("_cuts") else stem) + "_card.json")
    return json.loads(card.read_text()) if card.is_file() else None


def _evaluate_all(args, model) -> dict:
    """Every given set evaluated as the paper does -> {set: {"metrics", "card", "deviations", "notes", ...}}."""
    results = {}
    runs = [(n, "retrieval" if n == "psc" else "zeroshot", getattr(args, n)) for n in ALL_SETS if getattr(args, n)]
    if args.ratings:
        runs.append(("similarity", "similarity", None))
    for name, task, paths in runs:
        one = argparse.Namespace(**{**vars(args), "task": task, "manifest": paths and paths[0],
                                    "audio_root": paths[1] if paths and len(paths) > 1 else None,
                                    "dataset": name if task == "zeroshot" else None})
        print(f"== {name} ({task}) ==", flush=True)
        metrics, found = _evaluate(one, model)
        entry = {"inputs": {"manifest": one.manifest, "audio_root": one.audio_root} if paths else
                 {"ratings": args.ratings, "audio_root": args.audio_root},
                 "metrics": metrics, **found, "card": _card(one.manifest) if paths else None}
        if task == "zeroshot":
            entry["ensemble"] = args.ensemble
        notes = []
        if paths and args.check_overlap:
            one.manifest = paths[0]
            entry["overlap"] = _check_overlap(one)
            notes.append(overlap.summary_line(entry["overlap"]))
        else:
            entry["overlap"] = {"checked": False}
            notes.append("leakage check not run (--check-overlap TRAIN_MANIFESTS)" if paths else
                         "leakage check: not applicable to a ratings CSV")
        if entry["card"]:
            notes.append(f"card: protocol {entry['card']['protocol']}, {entry['card']['num_cuts']} cuts, "
                         f"cut_list_sha256 {entry['card']['cut_list_sha256'][:12]}")
        entry["deviations"], entry["notes"] = paper_report.deviations(entry), notes
        results[name] = entry
    return results


def _write_report(args, sets: dict, weights: dict) -> None:
    """OUT/results.json and OUT/results.md of --task all (with which weights were evaluated); prints the
    tables."""
    out = epath.Path(args.out or "eval_all")
    out.mkdir(parents=True, exist_ok=True)
    results = {"task": "all", "checkpoint": weights["path"], "weights": weights, "paper": paper_report.PAPER,
               "sets": sets}
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=2) + "\n")
    table = paper_report.markdown(sets)
    (out / "results.md").write_text(table)
    print(table, end="")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


def _write_results(args, metrics: dict, report: dict) -> None:
    """OUT/results.json and OUT/results.md; prints the table."""
    out = epath.Path(args.out or f"eval_{args.task}")
    out.mkdir(parents=True, exist_ok=True)
    inputs = {k: getattr(args, k) for k in ("manifest", "data_dir", "split", "audio_root", "dataset",
                                             "label_field", "ratings") if getattr(args, k)}
    if args.task == "zeroshot":
        inputs["ensemble"] = args.ensemble
    results = {"task": args.task, "checkpoint": report["weights"]["path"], "inputs": inputs,
               "metrics": metrics, **report}
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=2) + "\n")
    table = markdown(args.task, metrics, report)
    (out / "results.md").write_text(table)
    print(table, end="")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


if __name__ == "__main__":
    _setup_logging()
    sys.exit(main())
