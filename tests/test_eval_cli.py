"""`python -m clsp_jax.eval` end to end on tiny generated sets (retrieval on a manifest with a missing
file and on the same clips as a TFDS split, a RAVDESS-layout zero-shot set at 48 kHz, a ratings CSV),
checked against metrics computed directly from the audio files with the same model; the count of clips
embedded in windows; and its one-line errors (exit code 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import soxr

import fcaps_fixtures as ff
from clsp_jax import eval as cli
from clsp_jax.evals import metrics as M
from clsp_jax.evals.prompts import ZERO_SHOT_TASKS
from data_prep import eval_sets
from data_prep.prepare import BuildSettings, prepare
from eval_fixtures import REPO, embed_in_eights


def read_results(out_dir):
    return json.loads((out_dir / "results.json").read_text()), (out_dir / "results.md").read_text()


def test_retrieval_on_a_manifest_with_a_missing_file(run, checkpoint, tmp_path, caplog):
    _, model = checkpoint
    manifest, audio_root, records = ff.make_corpus(tmp_path / "src", 8, min_s=1.2, max_s=1.9, seed=5)
    (audio_root / "c0006.wav").unlink()
    rc, out, err = run("--task", "retrieval", "--manifest", str(manifest), "--audio-root", str(audio_root),
                       "--out", str(tmp_path / "res"), "--batch-size", "8")
    assert rc == 0, err
    results, table = read_results(tmp_path / "res")
    assert results["num_clips"] == 8 and results["num_failed"] == 1
    assert results["failed"]["clip0006"].startswith("missing_audio")
    kept = [r for r in records if r["id"] != "clip0006"]
    waves = [sf.read(audio_root / r["recording"]["sources"][0]["source"], dtype="float32")[0] for r in kept]
    audio = embed_in_eights(model, waves)
    custom = [r["supervisions"][0]["custom"] for r in kept]
    expected = {"global/num_clips": 7, "finegrained/num_clips": 7}
    for kind, texts in (("global", [c["global_captions"][0] for c in custom]),
                        ("finegrained", [sorted(c["finegrained_captions"], key=len)[-1] for c in custom])):
        sim = audio @ model.embed_text(texts).T
        expected.update({f"{kind}/{k}": v for k, v in M.speech_text_retrieval(sim, np.arange(7)).items()})
    assert results["metrics"] == pytest.approx(expected)
    r1 = f"{100 * expected['global/s2t/R@1']:.1f}"
    assert f"| global | s2t | {r1} |" in table and table in out
    assert "audio failed: missing_audio 1" in table and "skipping clip clip0006: missing_audio" in caplog.text

    # The same clips as a prepared TFDS split (the build rejects the missing file): the same numbers.
    prepare([manifest], split="test", data_dir=tmp_path / "tfds", settings=BuildSettings(str(audio_root), min_duration=1.0))
    rc, _, err = run("--task", "retrieval", "--data-dir", str(tmp_path / "tfds"), "--split", "test",
                     "--out", str(tmp_path / "res_tfds"), "--batch-size", "8")
    assert rc == 0, err
    tfds_results, _ = read_results(tmp_path / "res_tfds")
    assert tfds_results["num_clips"] == 7 and tfds_results["metrics"] == pytest.approx(expected)


def test_zero_shot_on_a_ravdess_layout(run, checkpoint, tmp_path):
    _, model = checkpoint
    root = tmp_path / "ravdess"
    for k in range(8):  # emotion codes 01..08, actors 1..8 (odd male, even female), 48 kHz files
        ff.write_audio(root / f"Actor_{k + 1:02d}" / f"03-01-{k + 1:02d}-01-01-01-{k + 1:02d}.wav",
                       ff.tone(1.5, rate=48000, seed=k), rate=48000)
    manifest, built = eval_sets.build("ravdess", root, tmp_path / "manifests", protocol="original")
    assert len(built.cuts) == 8
    rc, out, err = run("--task", "zeroshot", "--dataset", "ravdess", "--manifest", str(manifest),
                       "--audio-root", str(root), "--out", str(tmp_path / "res"), "--batch-size", "8")
    assert rc == 0, err
    results, table = read_results(tmp_path / "res")
    waves = [soxr.resample(sf.read(root / c["recording"]["sources"][0]["source"], dtype="float32")[0],
                           48000, 16000, quality="HQ") for c in built.cuts]
    audio = embed_in_eights(model, waves)
    for task in ("ravdess_emotion", "ravdess_gender"):
        key, prompts = ZERO_SHOT_TASKS[task]
        classes = list(dict.fromkeys(c for _, c in prompts))
        pred = np.argmax(audio @ model.embed_text([p for p, _ in prompts]).T, axis=1)
        labels = [classes.index(c["supervisions"][0]["custom"][key]) for c in built.cuts]
        expected = M.zero_shot_metrics(np.array([classes.index(prompts[p][1]) for p in pred]), np.array(labels), classes)
        got = {k[len(task) + 1:]: v for k, v in results["metrics"].items() if k.startswith(task + "/")}
        assert got == pytest.approx({**expected, "num_clips": 8, "num_unlabelled": 0})
    assert "| ravdess_gender |" in table and results["num_failed"] == 0


def test_similarity_on_audio_pairs(run, checkpoint, tmp_path):
    _, model = checkpoint
    for i in range(4):
        ff.write_audio(tmp_path / f"a{i}.wav", ff.tone(1.0 + 0.2 * i, seed=i))
    pairs = [(0, 1, 4.0), (0, 2, 3.0), (1, 3, 1.5), (2, 3, 2.0), (0, 3, 1.0)]
    (tmp_path / "r.csv").write_text("audio_a,audio_b,score\n" + "".join(f"a{a}.wav,a{b}.wav,{s}\n" for a, b, s in pairs))
    rc, out, err = run("--task", "similarity", "--ratings", str(tmp_path / "r.csv"), "--out", str(tmp_path / "res"),
                       "--batch-size", "8")
    assert rc == 0, err
    results, _ = read_results(tmp_path / "res")
    audio = embed_in_eights(model, [sf.read(tmp_path / f"a{i}.wav", dtype="float32")[0] for i in range(4)])
    expected = M.similarity_correlations(np.array([audio[a] @ audio[b] for a, b, _ in pairs]),
                                         np.array([s for *_, s in pairs]))
    # The cosines of these similar tones are all close to 1, so float32 rounding of the two embedding paths
    # moves Pearson's r by ~2e-5: compare to 1e-4.
    assert results["metrics"] == pytest.approx({**{f"all/{k}": v for k, v in expected.items()},
                                                "all/num_pairs": 5, "num_pairs_skipped": 0}, abs=1e-4)


@pytest.mark.parametrize("argv,message", [
    (["--task", "retrieval"], "retrieval needs either --manifest or --data-dir with --split"),
    (["--task", "retrieval", "--manifest", "nope.jsonl.gz"], "--manifest nope.jsonl.gz does not exist"),
    (["--task", "retrieval", "--data-dir", "."], "--data-dir and --split go together"),
    (["--task", "zeroshot", "--manifest", "m"], "zeroshot needs --dataset"),
    (["--task", "zeroshot", "--dataset", "cremad", "--label-field", "gender", "--manifest", "M"],
     "cremad has no gender task"),
    (["--task", "similarity"], "similarity needs --ratings"),
    (["--task", "translate"], "argument --task: invalid choice: 'translate'"),
    (["--task", "similarity", "--ratings", "M", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--workdir", "run", "--task", "similarity", "--ratings", "M"], "--checkpoint and --workdir exclude each other"),
    (["--task", "similarity", "--ratings", "M", "--weights", "raw"], "--step and --weights go with --workdir"),
    (["--task", "all"], "--task all needs at least one of --psc, --ravdess, --cremad, --iemocap, --ratings"),
    (["--task", "all", "--ravdess", "M", "a", "b"], "--ravdess takes a manifest and at most one audio root"),
])
def test_bad_arguments_give_one_line_and_exit_code_2(argv, message, tmp_path, capsys, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    (tmp_path / "M").write_text("")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--checkpoint", "ckpt", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"clsp_jax.eval: error: {err[0].split('error: ', 1)[1]}"] and message in err[0]


def test_module_entry_point_reports_a_missing_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "clsp_jax.eval", "--checkpoint", str(tmp_path / "none"),
                           "--task", "retrieval"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"clsp_jax.eval: error: --checkpoint {tmp_path / 'none'} is not a saved CLSP (no config.json)")


def test_a_training_run_is_evaluated_with_its_averaged_weights_by_default(checkpoint, tmp_path, monkeypatch, capsys):
    """--workdir: step 2 of the run holds a running average (its logit_scale 1 above the raw one), step 1 none.
    Default: the averaged weights of the latest step; --weights raw: the raw ones; --step 1: the raw ones,
    saying why; --weights averaged there: a one-line error. results.json and the table say which weights."""
    import shutil

    import jax
    from flax import nnx

    from clsp_jax.inference import CLSP
    from clsp_jax.train import checkpoint as checkpoints
    from eval_fixtures import TOKENIZER

    _, model = checkpoint
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model.net, nnx.Param)))
    run = tmp_path / "run"
    manager = checkpoints.make_manager(str(run), every_steps=1)
    for step in (1, 2):
        state = {"step": np.int32(step), "params": params, "opt_state": {}, "ema": None,
                 "nonfinite_streak": np.int32(0)}
        if step == 2:
            state["average"] = {"count": np.int32(1), "mean": {**params, "logit_scale": params["logit_scale"] + 1},
                                "comp": jax.tree.map(np.zeros_like, params)}
        checkpoints.save(manager, step, state, data_state={"next_index": step}, force=True)
    manager.wait_until_finished()
    manager.close()
    (run / "config.json").write_text(json.dumps({"model": model.config}))
    shutil.copyfile(TOKENIZER, run / "tokenizer.json")
    # The network built from the restored weights is the fixture's (compiled already); the scale tells which.
    scales = []
    monkeypatch.setattr(CLSP, "from_params", classmethod(
        lambda cls, p, config, tokenizer=None: scales.append(float(p["logit_scale"])) or model))
    for i in range(4):  # test_similarity_on_audio_pairs's clips and batch size: its compiled programs
        ff.write_audio(tmp_path / f"a{i}.wav", ff.tone(1.0 + 0.2 * i, seed=i))
    (tmp_path / "r.csv").write_text("audio_a,audio_b,score\na0.wav,a1.wav,3\na0.wav,a2.wav,2\na1.wav,a3.wav,1\n")
    raw = float(params["logit_scale"])
    for argv, weights, step, scale in (([], "averaged", 2, raw + 1), (["--weights", "raw"], "raw", 2, raw),
                                       (["--step", "1"], "raw", 1, raw)):
        out = tmp_path / f"res_{weights}_{step}"
        assert cli.main(["--workdir", str(run), *argv, "--task", "similarity", "--ratings", str(tmp_path / "r.csv"),
                         "--out", str(out), "--batch-size", "8"]) == 0, capsys.readouterr().err
        results, table = read_results(out)
        assert scales[-1] == pytest.approx(scale)
        assert results["weights"]["weights"] == weights and results["weights"]["step"] == step
        assert f"{weights} weights of step {step} of {run}" in table
        assert results["checkpoint"] == str(run)
    assert "no averaged weights (optim.average_period was off)" in results["weights"]["averaged_unavailable"]
    assert "(the checkpoint has no averaged weights)" in table
    capsys.readouterr()
    assert cli.main(["--workdir", str(run), "--step", "1", "--weights", "averaged", "--task", "similarity",
                     "--ratings", str(tmp_path / "r.csv"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == ("clsp_jax.eval: error: the checkpoint at step 1 has no averaged "
                                               "weights (optim.average_period was off)")


def test_long_clips_are_windowed_and_counted():
    """The eval's audio embedding passes --max-audio-seconds to CLSP.embed_audio (which windows longer clips,
    tested in test_embed.py) and counts the valid clips longer than it; the table's note reports them."""
    calls = []

    class Model:
        def embed_audio(self, audio, audio_lens, *, max_seconds):
            calls.append(max_seconds)
            return np.zeros((len(audio), 4), np.float32)

    report = {}
    embed_audio, _ = cli._embed_fns(Model(), 2.0, report)
    batch = {"audio": np.zeros((3, 40000), np.float32), "audio_lens": np.array([40000, 32000, 40000]),
             "valid": np.array([True, True, False])}  # 2.5 s, exactly 2 s, an invalid 2.5 s row
    assert embed_audio(batch).shape == (3, 4) and calls == [2.0]
    assert report == {"max_audio_seconds": 2.0, "num_windowed": 1}
    metrics = {"all/pearson": 0.5, "all/spearman": 0.5, "all/kendall": 0.5, "all/num_pairs": 3, "num_pairs_skipped": 0}
    assert "longer than 2 s, embedded in windows: 1" in cli.markdown("similarity", metrics, {**report, "num_clips": 3})


def test_check_overlap_alone(tmp_path, capsys):
    """`--check-overlap` without a checkpoint writes the overlap block alone; a shared recording, path and
    transcript are found; without --manifest it is a one-line error."""
    from data_prep import manifest_writer

    def cut(i, speaker):
        rec = manifest_writer.recording(f"r{i}", f"a{i}.wav", 16000, 16000)
        return manifest_writer.mono_cut(f"c{i}", rec, text=f"Sentence {i}.", speaker=speaker)

    train, evalm = tmp_path / "train.jsonl.gz", tmp_path / "eval.jsonl.gz"
    manifest_writer.write_jsonl_gz(train, [cut(0, "s0"), cut(1, "s1")])
    manifest_writer.write_jsonl_gz(evalm, [cut(1, "s9"), cut(2, "s2")])  # c1: same recording, path and text
    assert cli.main(["--check-overlap", str(train), "--manifest", str(evalm), "--out", str(tmp_path / "o")]) == 0
    block = json.loads((tmp_path / "o" / "overlap.json").read_text())
    assert block["checked"] and block["eval_cuts_affected"] == 1
    assert {k: v["shared"] for k, v in block["kinds"].items()} == {
        "speakers": 0, "recordings": 1, "audio_paths": 1, "transcripts": 1}
    assert "overlap with training data: 1 of 2 eval cuts share" in capsys.readouterr().out
    assert cli.main(["--check-overlap", str(train)]) == 2
    assert capsys.readouterr().err.strip() == "clsp_jax.eval: error: --check-overlap needs --manifest (the evaluation set)"


def test_task_all_report_with_cards_deviations_and_overlap(run, tmp_path):
    """`--task all` on a RAVDESS set built by the paper's protocol (X-ARES folds layout, 8 clips) and a PSC set
    built from one manifest (not the paper's protocol), with the leakage check against the PSC manifest itself:
    RAVDESS rows carry the paper's numbers where it reports them (gender WA 100.0, emotion WA 46.8; no emotion
    UA in the paper: empty), PSC rows are not comparable (n/c) for its protocol and for its overlap, the sets
    not given say "not run", and the JSON holds each set's metrics, card and deviations."""
    words = ("neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised")
    root = tmp_path / "ravdess"
    for k, word in enumerate(words):
        stem = f"03-01-{k + 1:02d}-01-01-01-{k + 1:02d}"
        ff.write_audio(root / f"fold_{k % 4}" / f"{stem}.wav", ff.tone(1.2, seed=k))
        (root / f"fold_{k % 4}" / f"{stem}.json").write_text(json.dumps({"emotion": word}))
    ravdess, _ = eval_sets.build("ravdess", root, tmp_path / "sets")
    corpus, audio_root, _ = ff.make_corpus(tmp_path / "src", 6, min_s=1.2, max_s=1.9, seed=3)
    psc, _ = eval_sets.build("psc", corpus, tmp_path / "sets", protocol="manifest")
    rc, out, err = run("--task", "all", "--ravdess", str(ravdess), str(root), "--psc", str(psc), str(audio_root),
                       "--check-overlap", str(corpus), "--out", str(tmp_path / "res"), "--batch-size", "8")
    assert rc == 0, err
    results, table = read_results(tmp_path / "res")
    sets = results["sets"]
    assert list(sets) == ["psc", "ravdess"]
    assert sets["ravdess"]["deviations"] == [] and sets["ravdess"]["card"]["protocol"] == "folds"
    assert sets["ravdess"]["metrics"]["ravdess_gender/num_clips"] == 8 and sets["ravdess"]["overlap"]["clean"]
    assert [d.split(":")[0] for d in sets["psc"]["deviations"]] == [
        "protocol 'manifest', not the paper's", "6 of 6 cuts overlap the training data (leakage check)"]
    m = sets["ravdess"]["metrics"]
    wa, ua, gender = (f"{100 * m[k]:.1f}" for k in ("ravdess_emotion/WA", "ravdess_emotion/UA", "ravdess_gender/WA"))
    assert f"| RAVDESS emotion (8) | {wa} | 46.8 | {ua} |  | as the paper |" in table
    assert f"| RAVDESS gender | {gender} | 100.0 |" in table
    r1 = f"{100 * sets['psc']['metrics']['global/s2t/R@1']:.1f}"
    assert f"| global captions | {r1} | n/c |" in table and "| IEMOCAP emotion (4) |" in table
    assert "|  |  |  |  | not run |" in table and table in out
    assert "- ravdess: overlap with training data: none" in table and "- psc: differs: protocol 'manifest'" in table
