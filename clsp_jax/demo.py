"""`make demo`: the whole CLSP recipe on a CPU, from nothing, in one command.

    synthesise an espeak-ng FCaps corpus -> prepare ArrayRecord splits -> train the tiny CLSP (stage 2,
    MiniLM text tower) -> evaluate on the held-out test split (retrieval, zero-shot gender, linear probes of
    its tags) -> metrics table + PNG plots

Every stage resumes: re-running after an interruption reuses the corpus, the prepared splits and the
latest checkpoint. Outputs go to --out (default demo_out/; demo_out_speech_tower/ with --train-speech-tower).

--train-speech-tower trains the Zipformer stacks too (`SPEECH_TOWER_TRAINS`), with icefall's ScaledAdam, in
place of `configs/tiny.py`'s frozen random tower; README "Demo results" compares the two.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time


SPLITS = ("train", "dev", "test")

# --train-speech-tower: the overrides of configs/tiny.py. ScaledAdam is the optimizer the Zipformer was designed
# for; its LR (icefall's for a Zipformer from scratch) scales each update by the tensor's RMS, so one LR serves
# the tower and the heads. Only the text encoder below its pooler stays frozen.
SPEECH_TOWER_TRAINS = {
    "optim.optimizer": "scaled_adam",
    "optim.base_lr": 0.045,
    "optim.frozen": (r"^text_encoder/(embeddings|encoder)/",),
    "train.cache_speech_states": False,
}


def _stage(title: str):
    print(f"\n== {title} ==", flush=True)
    return time.time()


def _done(started: float) -> float:
    seconds = time.time() - started
    print(f"done in {seconds:.0f} s")
    return seconds


def synthesise(out: str, num_clips: int, seed: int) -> str:
    from data_prep import synth_corpus

    corpus = os.path.join(out, "corpus")
    if all(os.path.exists(os.path.join(corpus, f"synth_cuts_{s}.jsonl.gz")) for s in SPLITS):
        print(f"corpus already in {corpus}")
    else:
        synth_corpus.build(corpus, num_clips, seed, workers=min(4, os.cpu_count() or 1))
    return corpus


def prepare(corpus: str, out: str) -> str:
    from clsp_jax.data.fcaps_format import builder_dir, existing_splits
    from data_prep.prepare import BuildSettings, prepare as prepare_split

    data_dir = os.path.join(out, "data")
    done = existing_splits(builder_dir(data_dir)) if os.path.isdir(builder_dir(data_dir)) else {}
    for split in SPLITS:
        if split in done:
            print(f"{split}: already prepared ({sum(done[split]['shardLengths'])} clips)")
            continue
        prepare_split([os.path.join(corpus, f"synth_cuts_{split}.jsonl.gz")], split=split, data_dir=data_dir,
                      settings=BuildSettings(audio_root=corpus), workers=min(2, os.cpu_count() or 1))
    return data_dir


def demo_config(data_dir: str, overrides: dict):
    """configs/tiny.py over `data_dir`, with `overrides` ({"section.key": value})."""
    from configs.tiny import get_config

    config = get_config()
    config.data.data_dir = data_dir
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def train(data_dir: str, out: str, overrides: dict) -> str:
    from clsp_jax.train.trainer import train as run_training

    workdir = os.path.join(out, "run")
    run_training(demo_config(data_dir, overrides), workdir)
    return workdir


def evaluate(workdir: str, data_dir: str) -> dict:
    """Retrieval (global and fine-grained, both directions), zero-shot gender and linear probes on the test
    split."""
    import jax

    from clsp_jax.data.pipeline import make_eval_batches
    from clsp_jax.evals import RetrievalEvaluator, ZeroShotEvaluator, model_embed_fns, paper_task
    from clsp_jax.inference import CLSP
    from clsp_jax.train.checkpoint import restore_params
    from clsp_jax.train.evaluation import gender_labels
    from configs.tiny import get_config

    params, config, step = restore_params(workdir)
    model = CLSP.from_params(params, config["model"], tokenizer=os.path.join(workdir, "tokenizer.json"))
    data_cfg = get_config().data
    batches = make_eval_batches(data_cfg, data_dir=data_dir, tokenizer=model.tokenizer, split="test",
                                process_index=jax.process_index(), process_count=jax.process_count())
    fns = model_embed_fns(model)
    metrics = RetrievalEvaluator(batches).run(*fns)
    gender = {"gender": paper_task("ravdess_gender", gender_labels(data_dir, "test", "fcaps"))}
    metrics.update(ZeroShotEvaluator(batches, gender, model.tokenizer).run(*fns))
    metrics.update({f"probe/{k}": v for k, v in linear_probe(model, batches, data_dir).items()})
    metrics["step"] = step
    return metrics, model, batches


def linear_probe(model, batches, data_dir: str) -> dict:
    """5-fold linear probes of the test clips' audio embeddings, one per tag the split has (gender, accent,
    pitch, speaking rate; clsp_jax.evals.probe)."""
    from clsp_jax.data.fcaps_format import TAG_FIELDS
    from clsp_jax.evals import model_embed_fns
    from clsp_jax.evals.probe import PROBE_ATTRIBUTES, LinearProbeEvaluator
    from clsp_jax.train.evaluation import split_labels

    tags = split_labels(data_dir, "test", "fcaps", TAG_FIELDS)
    labels = {a: tags[a] for a in PROBE_ATTRIBUTES if a in tags and any(tags[a])}
    return LinearProbeEvaluator(batches, labels).run(model_embed_fns(model)[0])


def table(metrics: dict) -> str:
    n = metrics["global/num_clips"]
    rows = ["| task | direction | R@1 | R@5 | R@10 | mAP@10 | chance R@1 |", "|---|---|---|---|---|---|---|"]
    for kind in ("global", "finegrained"):
        for direction in ("s2t", "t2s"):
            p = f"{kind}/{direction}"
            rows.append(f"| {kind} retrieval | {direction} | {100 * metrics[p + '/R@1']:.1f} | "
                        f"{100 * metrics[p + '/R@5']:.1f} | {100 * metrics[p + '/R@10']:.1f} | "
                        f"{100 * metrics[p + '/mAP@10']:.1f} | {100 / n:.1f} |")
    rows.append(f"| zero-shot gender | WA / UA | {100 * metrics['gender/WA']:.1f} / {100 * metrics['gender/UA']:.1f} "
                "| | | | 50.0 |")
    rows += ["", "| linear probe (5-fold) | accuracy | UA | classes | clips |", "|---|---|---|---|---|"]
    for attribute in sorted({k.split("/")[1] for k in metrics if k.startswith("probe/")}):
        p = f"probe/{attribute}"
        if f"{p}/accuracy" in metrics:
            rows.append(f"| {attribute} | {100 * metrics[p + '/accuracy']:.1f} | {100 * metrics[p + '/UA']:.1f} | "
                        f"{metrics[p + '/num_classes']} | {metrics[p + '/num_clips']} |")
    return "\n".join(rows)


def plots(workdir: str, model, batches, out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from clsp_jax.evals.evaluators import embed_clips

    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows])
    ax.set(xlabel="step", ylabel="multi-positive loss", title="tiny CLSP on the synthetic corpus")
    loss_png = os.path.join(out, "loss.png")
    fig.savefig(loss_png, dpi=120, bbox_inches="tight")

    from clsp_jax.evals import model_embed_fns

    emb = embed_clips(batches, *model_embed_fns(model), num_kinds=2)
    n = min(32, len(emb.index))
    sim = emb.audio[:n] @ emb.text[0][:n].T  # test clips x their global captions
    fig, ax = plt.subplots(figsize=(5, 5))
    im = ax.imshow(sim, cmap="viridis")
    ax.set(xlabel="global caption", ylabel="test clip", title=f"test similarity (first {n} clips)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    sim_png = os.path.join(out, "similarity.png")
    fig.savefig(sim_png, dpi=120, bbox_inches="tight")
    return [loss_png, sim_png]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder (default demo_out/, or demo_out_speech_tower/ with "
                                      "--train-speech-tower)")
    parser.add_argument("--num-clips", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-steps", type=int, default=None, help="training steps (default: configs/tiny.py)")
    parser.add_argument("--train-speech-tower", action="store_true",
                        help="train the Zipformer stacks too, with ScaledAdam (default: a frozen random tower)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("matplotlib") is None:  # needed only by the last stage: say so before training
        sys.exit("clsp_jax.demo: matplotlib (the demo's plots) is not installed: pip install -e '.[demo]'")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)  # an import has already given the root logger a handler
    logging.getLogger("absl").setLevel(logging.WARNING)
    out = os.path.abspath(args.out or ("demo_out_speech_tower" if args.train_speech_tower else "demo_out"))
    os.makedirs(out, exist_ok=True)
    start = time.time()
    times = {}

    t = _stage("1/5 synthesise the espeak-ng corpus")
    corpus = synthesise(out, args.num_clips, args.seed)
    times["synthesise"] = _done(t)
    t = _stage("2/5 prepare ArrayRecord splits")
    data_dir = prepare(corpus, out)
    times["prepare"] = _done(t)
    t = _stage("3/5 train the tiny CLSP (stage 2, CPU" + (", speech tower training)" if args.train_speech_tower
                                                          else ")"))
    overrides = dict(SPEECH_TOWER_TRAINS) if args.train_speech_tower else {}
    if args.num_steps:
        overrides["train.num_steps"] = args.num_steps
    workdir = train(data_dir, out, overrides)
    times["train"] = _done(t)
    t = _stage("4/5 evaluate on the held-out test split")
    metrics, model, batches = evaluate(workdir, data_dir)
    md = table(metrics)
    print(md)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md + "\n")
    times["evaluate"] = _done(t)
    t = _stage("5/5 plots")
    for path in plots(workdir, model, batches, out):
        print(f"wrote {path}")
    times["plots"] = _done(t)
    print("\nstage times: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in times.items()))
    print(f"demo finished in {(time.time() - start) / 60:.1f} min; results in {out}")

if __name__ == "__main__":
    main()
