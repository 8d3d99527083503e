"""clsp_jax.evals evaluators: exact metrics with oracle embeddings (padding, caption kinds, two simulated
hosts, prompt ensembles, rated pairs, failed audio), and a tiny CLSP on a prepared TFDS split against
embeddings computed directly from the audio files."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
import soundfile as sf
from flax import nnx

import fcaps_fixtures as ff
from eval_fixtures import TOKENIZER, embed_in_eights, tiny_clsp
from clsp_jax.data.config import default_config
from clsp_jax.data.pipeline import make_eval_batches
from clsp_jax.evals import evaluators as E
from clsp_jax.evals import metrics as M
from clsp_jax.evals import sources
from clsp_jax.tokenizer import CaptionTokenizer
from data_prep.prepare import BuildSettings, prepare

DIM = 16


def one_hot(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i] = 1.0
    return v


class TextOracle:
    """embed_text_fn returning a chosen vector per known text (zeros for anything else, e.g. padding)."""

    def __init__(self, tokenizer: CaptionTokenizer, vectors: dict[str, np.ndarray]):
        self.table = {}
        for text, v in vectors.items():
            tokens = tokenizer([text])
            self.table[tuple(tokens["input_ids"][0][tokens["attention_mask"][0] == 1])] = v

    def __call__(self, tokens):
        rows = [tuple(ids[mask == 1]) for ids, mask in zip(tokens["input_ids"], tokens["attention_mask"])]
        return np.stack([self.table.get(r, np.zeros(DIM, np.float32)) for r in rows])


def audio_oracle(vectors: dict[int, np.ndarray]):
    """embed_audio_fn giving clip `index` its chosen vector (padding rows: zeros)."""
    return lambda batch: np.stack([vectors.get(int(i), np.zeros(DIM, np.float32)) for i in batch["index"]])


class FakeHosts:
    """process_allgather(tiled=True) between threads standing in for hosts."""

    def __init__(self, n: int):
        self.barrier, self.slots = threading.Barrier(n), [None] * n

    def gather(self, p: int):
        def fn(x):
            self.slots[p] = np.asarray(x)
            self.barrier.wait()
            out = np.concatenate(self.slots)
            self.barrier.wait()
            return out
        return fn

    def run(self, make_and_run):
        results = [None] * len(self.slots)

        def host(p):
            results[p] = make_and_run(p, self.gather(p))

        threads = [threading.Thread(target=host, args=(p,)) for p in range(len(self.slots))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results


@pytest.fixture(scope="module")
def tokenizer():
    return CaptionTokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """10 clips (2.1-3.5 s); clip 3 has no global caption."""
    root = tmp_path_factory.mktemp("corpus")
    manifest, audio_root, records = ff.make_corpus(root, 10, min_s=2.1, max_s=3.5)
    records[3]["supervisions"][0]["custom"]["global_captions"] = []
    ff.write_manifest(manifest, records)
    return manifest, audio_root, records


def test_retrieval_exact_metrics_with_padding_kinds_and_two_hosts(corpus, tokenizer):
    manifest, audio_root, _ = corpus
    read = sources.read_manifest(manifest, audio_root, kinds=("global", "finegrained"))
    assert len(read.clips) == 10 and read.clips[3].captions[0] is None
    n = len(read.clips)
    audio = {i: one_hot(i) for i in range(n)}
    # Global captions: perfect. Fine-grained caption j is closer to clip j+1 than to its own clip j, so
    # every query ranks its answer second in both directions.
    texts = {}
    for i, clip in enumerate(read.clips):
        if clip.captions[0] is not None:
            texts[clip.captions[0]] = one_hot(i)
        texts[clip.captions[1]] = one_hot(i) + 1.5 * one_hot((i + 1) % n)
    expected = {"global/num_clips": 9, "finegrained/num_clips": 10}
    for d in ("s2t", "t2s"):
        expected.update({f"global/{d}/R@1": 1.0, f"global/{d}/R@5": 1.0, f"global/{d}/R@10": 1.0,
                         f"global/{d}/mAP@10": 1.0, f"global/{d}/mean_rank": 1.0, f"global/{d}/median_rank": 1.0,
                         f"finegrained/{d}/R@1": 0.0, f"finegrained/{d}/R@5": 1.0, f"finegrained/{d}/R@10": 1.0,
                         f"finegrained/{d}/mAP@10": 0.5, f"finegrained/{d}/mean_rank": 2.0,
                         f"finegrained/{d}/median_rank": 2.0})
    text_fn = TextOracle(tokenizer, texts)

    one = sources.WaveformBatches(read.clips, 4, tokenizer=tokenizer, kinds=("global", "finegrained"))
    assert len(one) == 3  # 10 clips in global batches of 4: the last has 2 padded rows
    assert E.RetrievalEvaluator(one).run(audio_oracle(audio), text_fn) == pytest.approx(expected)

    def host(p, gather):
        batches = sources.WaveformBatches(read.clips, 4, tokenizer=tokenizer, kinds=("global", "finegrained"),
                                          process_index=p, process_count=2)
        return E.RetrievalEvaluator(batches, gather=gather).run(audio_oracle(audio), text_fn)

    for metrics in FakeHosts(2).run(host):
        assert metrics == pytest.approx(expected)


def test_waveform_batches_layout_and_failed_audio(corpus, tokenizer, tmp_path):
    manifest, audio_root, records = corpus
    read = sources.read_manifest(manifest, audio_root, kinds=("global", "finegrained"))
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really a wav file")
    clips = read.clips[:5] + [
        sources.EvalClip("missing", 40000, lambda: sources.load_audio_file(tmp_path / "nope.wav"), (None, "x")),
        sources.EvalClip("corrupt", 40000, lambda: sources.load_audio_file(broken), (None, "y")),
    ]
    batches = sources.WaveformBatches(clips, 4, tokenizer=tokenizer, kinds=("global", "finegrained"))
    seen = {}
    for batch in batches:
        assert batch["audio"].shape[0] == 4 and batch["input_ids"].shape[0] == 8
        for r in np.flatnonzero(batch["valid"]):
            seen[int(batch["index"][r])] = batch["audio"][r, : batch["audio_lens"][r]]
        assert np.all(batch["audio_lens"][~batch["valid"]] == 1280)  # embeddable filler rows
    assert sorted(seen) == [0, 1, 2, 3, 4]
    wave, rate = sf.read(audio_root / records[2]["recording"]["sources"][0]["source"], dtype="float32")
    assert rate == 16000
    np.testing.assert_allclose(seen[2], wave, atol=1e-6)
    assert set(batches.failures) == {"missing", "corrupt"}
    assert batches.failures["missing"].startswith("missing_audio")
    assert batches.failures["corrupt"].startswith("decode_error")


def test_zero_shot_max_and_mean_ensembles(tokenizer):
    labels = ["happy"] * 4 + ["angry"] * 3 + ["sad"] * 2 + [None]
    task = E.paper_task("iemocap_emotion", labels)
    assert task.classes == ("happy", "angry", "sad", "neutral")
    prompts = [p for p, _ in task.prompts]  # happy, excited (-> happy), angry, sad, neutral
    text_fn = TextOracle(tokenizer, {p: one_hot(k) for k, p in enumerate(prompts)})
    e = one_hot
    audio = {0: e(0), 1: e(1), 2: e(1) + 0.8 * e(2), 3: e(3), 4: e(2), 5: e(2), 6: e(4), 7: e(3), 8: e(3), 9: e(0)}
    clips = [sources.EvalClip(f"c{i}", 20000, lambda: np.zeros(20000, np.float32)) for i in range(10)]
    batches = sources.WaveformBatches(clips, 4)
    best = E.ZeroShotEvaluator(batches, {"iemocap": task}, tokenizer).run(audio_oracle(audio), text_fn)
    # Clip 1 matches the "excited" prompt: happy. Wrong: clip 3 (sad), clip 6 (neutral).
    assert best == pytest.approx({"iemocap/num_clips": 9, "iemocap/num_unlabelled": 1, "iemocap/WA": 7 / 9,
                                  "iemocap/UA": (3 / 4 + 2 / 3 + 1) / 3, "iemocap/recall/happy": 0.75,
                                  "iemocap/recall/angry": 2 / 3, "iemocap/recall/sad": 1.0})
    mean = E.ZeroShotEvaluator(batches, {"iemocap": task}, tokenizer, ensemble="mean").run(audio_oracle(audio), text_fn)
    # Averaging happy's two prompts (1/sqrt 2 = 0.707 < 0.8) turns clip 2 into angry.
    assert mean["iemocap/WA"] == pytest.approx(6 / 9)
    assert mean["iemocap/recall/happy"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"labels \['bored'\] have no prompt"):
        E.ZeroShotEvaluator(batches, {"t": E.paper_task("iemocap_emotion", ["bored"] * 10)}, tokenizer).run(
            audio_oracle(audio), text_fn)


def test_similarity_from_a_ratings_csv_with_a_missing_file(tmp_path, tokenizer):
    for i in range(4):
        ff.write_audio(tmp_path / f"a{i}.wav", ff.tone(1.0, seed=i))
    rows = ["audio,caption,score,subset", "a0.wav,calm voice,4.5,intrinsic", "a1.wav,calm voice,3.0,intrinsic",
            "a2.wav,calm voice,1.0,situational", "a3.wav,loud voice,2.0,situational",
            "gone.wav,loud voice,5.0,situational", "a0.wav,loud voice,2.5,intrinsic"]
    (tmp_path / "ratings.csv").write_text("\n".join(rows) + "\n")
    clips, pairs = sources.read_ratings(tmp_path / "ratings.csv")
    assert len(clips) == 5 and len(pairs) == 6 and pairs[4].caption == "loud voice"
    angle = lambda t: np.cos(t) * one_hot(0) + np.sin(t) * one_hot(1)
    audio = {0: angle(0.0), 1: angle(0.3), 2: angle(0.9), 3: angle(1.2)}
    text_fn = TextOracle(tokenizer, {"calm voice": angle(0.1), "loud voice": angle(1.0)})
    metrics = E.SimilarityEvaluator(sources.WaveformBatches(clips, 4), pairs, tokenizer).run(
        audio_oracle(audio), text_fn)
    model = np.cos([0.1, 0.2, 0.8, 0.2, 1.0])  # angle differences of the 5 usable pairs
    human = np.array([4.5, 3.0, 1.0, 2.0, 2.5])
    r = np.corrcoef(model, human)[0, 1]
    assert metrics["num_pairs_skipped"] == 1 and metrics["all/num_pairs"] == 5
    assert metrics["all/pearson"] == pytest.approx(r, abs=1e-5)
    # 7 concordant, 2 discordant ((3, 5), (4, 5)), pairs 2 and 4 tie in the model: tau_b = 5 / sqrt(9 * 10).
    assert metrics["all/kendall"] == pytest.approx(5 / np.sqrt(90))
    assert metrics["intrinsic/num_pairs"] == 3 and metrics["intrinsic/spearman"] == pytest.approx(1.0)
    assert metrics["situational/num_pairs"] == 2 and metrics["situational/kendall"] == pytest.approx(1.0)


def test_ratings_csv_errors(tmp_path):
    (tmp_path / "bad.csv").write_text("clip,text,rating\na.wav,x,1\n")
    with pytest.raises(ValueError, match="columns must be"):
        sources.read_ratings(tmp_path / "bad.csv")
    (tmp_path / "nan.csv").write_text("audio_a,audio_b,score\na.wav,b.wav,high\n")
    with pytest.raises(ValueError, match=r"nan.csv:2: score 'high' is not a number"):
        sources.read_ratings(tmp_path / "nan.csv")


@pytest.fixture(scope="module")
def model():
    return tiny_clsp()


def test_tiny_clsp_on_a_tfds_split_matches_direct_embeddings(model, tmp_path):
    manifest, audio_root, records = ff.make_corpus(tmp_path / "src", 10, min_s=1.2, max_s=1.9, seed=3)
    records[3]["supervisions"][0]["custom"]["global_captions"] = []
    ff.write_manifest(manifest, records)
    data_dir = tmp_path / "tfds"
    prepare([manifest], split="test", data_dir=data_dir, settings=BuildSettings(str(audio_root), min_duration=1.0))
    batches = make_eval_batches(default_config(), data_dir=data_dir, tokenizer=model.tokenizer, split="test",
                                batch_size=8, process_index=0, process_count=1)
    fns = E.model_embed_fns(model)
    metrics = E.RetrievalEvaluator(batches).run(*fns)

    # Reference: the clips embedded straight from the wav files, captions as the authors pick them.
    waves = [sf.read(audio_root / r["recording"]["sources"][0]["source"], dtype="float32")[0] for r in records]
    audio = embed_in_eights(model, waves)
    custom = [r["supervisions"][0]["custom"] for r in records]
    fine = model.embed_text([sorted(c["finegrained_captions"], key=len)[-1] for c in custom])
    has_global = [i for i, c in enumerate(custom) if c["global_captions"]]
    first_global = model.embed_text([custom[i]["global_captions"][0] for i in has_global])
    expected = {"global/num_clips": 9, "finegrained/num_clips": 10}
    for kind, sim in (("global", audio[has_global] @ first_global.T), ("finegrained", audio @ fine.T)):
        expected.update({f"{kind}/{k}": v for k, v in M.speech_text_retrieval(sim, np.arange(len(sim))).items()})
    assert metrics == pytest.approx(expected)

    # The training-side embedder over the train state's plain params dict gives the same embeddings.
    graphdef, params, rest = nnx.split(model.net, nnx.Param, ...)
    audio_fn, text_fn = E.NetEmbedder(graphdef, rest).fns(nnx.to_pure_dict(params))
    batch = next(iter(batches))
    np.testing.assert_allclose(audio_fn(batch), fns[0](batch), atol=2e-5)
    tokens = {k: batch[k][:8] for k in ("input_ids", "attention_mask")}
    np.testing.assert_allclose(text_fn(tokens), fns[1](tokens), atol=2e-5)


def _config(evaluators: dict, **train):
    """configs/tiny.py with `evaluators` as config.eval.evaluators and `train` overrides."""
    import ml_collections

    from configs.tiny import get_config

    config = get_config()
    config.eval.evaluators = ml_collections.ConfigDict(evaluators)
    config.train.update(train)
    return config


@pytest.mark.parametrize("spec,message", [
    (dict(kind="nearest", every_steps=1, split="dev"), "kind 'nearest': choose from"),
    (dict(kind="retrieval", every_steps=1, split="dev", tasks=("gender",)), "retrieval takes no ['tasks']"),
    (dict(kind="zeroshot", every_steps=1, split="dev"), "zeroshot needs tasks"),
    (dict(kind="linear_probe", every_steps=1), "needs split or manifest"),
    (dict(kind="retrieval", every_steps=-1, split="dev"), "every_steps must be an integer >= 0"),
    (dict(kind="similarity", every_steps=1, ratings="/nowhere.csv"), "ratings: /nowhere.csv is not a file"),
])
def test_evaluator_specs_are_checked(spec, message):
    from clsp_jax.train.evaluation import check_evaluators

    with pytest.raises(ValueError, match=re.escape(message)):
        check_evaluators(_config({"x": spec}))


def test_best_metric_must_come_from_an_enabled_evaluator():
    from clsp_jax.train.evaluation import check_evaluators

    specs = {"a": dict(kind="retrieval", every_steps=2, split="dev"), "b": dict(kind="retrieval", every_steps=0,
                                                                                 split="dev")}
    check_evaluators(_config(specs, keep_best_metric="a/global/s2t/R@1"))
    with pytest.raises(ValueError, match=r"'b/global/s2t/R@1' must be '<evaluator>/<metric>' of an enabled "
                                         r"evaluator \(a\)"):
        check_evaluators(_config(specs, keep_best_metric="b/global/s2t/R@1"))


def test_evaluators_from_config_on_a_manifest_run_on_their_own_periods(corpus, tokenizer):
    """Three kinds built from config specs on a manifest, with oracle embeddings: each runs at the multiples
    of its period and at the last step, its metrics under its name. Clip i's audio is e_(i mod 2) (gender:
    the fixture alternates female, male), so zero-shot gender and the gender probe are exact."""
    from clsp_jax.train.evaluation import Context, Evaluation, KINDS

    manifest, audio_root, _ = corpus
    config = _config({
        "ret": dict(kind="retrieval", every_steps=2, manifest=str(manifest), audio_root=str(audio_root)),
        "zs": dict(kind="zeroshot", every_steps=3, manifest=str(manifest), tasks=("gender",),
                   audio_root=str(audio_root)),
        "probe": dict(kind="linear_probe", every_steps=5, manifest=str(manifest), audio_root=str(audio_root),
                      folds=2),
    })
    config.data.eval_batch_size = 4
    ctx = Context(config, tokenizer, 0, 1)
    built = {n: (s.every_steps, KINDS[s.kind].build(s, ctx)) for n, s in config.eval.evaluators.items()}
    gender = {i: one_hot(i % 2) for i in range(10)}
    prompts = TextOracle(tokenizer, {"A female speaker.": one_hot(0), "A male speaker.": one_hot(1)})

    class Embedder:
        def fns(self, params):
            return audio_oracle(gender), prompts

    evaluation = Evaluation(built, Embedder())
    ran = {step: {k.split("/")[0] for k in evaluation(None, step, step == 6)}
           for step in range(1, 7) if evaluation.due(step, step == 6)}
    assert ran == {2: {"ret"}, 3: {"zs"}, 4: {"ret"}, 5: {"probe"}, 6: {"ret", "zs", "probe"}}
    metrics = evaluation(None, 6, True)
    assert metrics["zs/gender/WA"] == 1.0 and metrics["zs/gender/num_clips"] == 10
    assert metrics["probe/gender/accuracy"] == 1.0
    # The fixture's tags: probes for each attribute with labels (no emotion or age in these cuts).
    assert {k.split("/")[1] for k in metrics if k.startswith("probe/")} == {"gender", "accent", "pitch",
                                                                             "speaking_rate"}
    assert metrics["ret/global/num_clips"] == 9
