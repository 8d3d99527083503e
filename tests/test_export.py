"""`python -m clsp_jax.export` on a tiny work dir written without the trainer: three checkpoints of the
reference fixture network (step 1 = the authors' weights, steps 2-3 perturbed, EMA saved at 2-3, and
icefall's running average saved at 2-3 as averaging every step from step 2 would leave it)."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from clsp_jax import CLSP
from clsp_jax import export as cli
from clsp_jax.train import checkpoint
from eval_fixtures import FIXTURE, TOKENIZER


def _fixture():
    data = np.load(FIXTURE)
    state = {k[len("state_dict/"):]: data[k] for k in data.files if k.startswith("state_dict/")}
    return data, json.loads(str(data["config"])), state


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, fixture config, fixture state dict, {step: (params, ema)} as saved).

    The running average at step k >= 2 is the mean of the params of steps 2..k, stored as
    `clsp_jax.averaging` keeps it: float32 mean + float32 rest of the float64 mean."""
    workdir = tmp_path_factory.mktemp("run")
    data, config, state = _fixture()
    params = nnx.to_pure_dict(nnx.state(CLSP.from_torch(state, config).net, nnx.Param))
    params = jax.tree.map(np.asarray, params)
    rng = np.random.default_rng(0)
    saved = {}
    manager = checkpoint.make_manager(str(workdir), every_steps=1)
    for step in (1, 2, 3):
        p = params if step == 1 else jax.tree.map(
            lambda x: (x + rng.normal(0, 0.05, x.shape)).astype(np.float32), params)
        ema = None if step == 1 else jax.tree.map(lambda x: (0.5 * x).astype(np.float32), p)
        saved[step] = (p, ema)
        train_state = {"step": np.int32(step), "params": p, "opt_state": {}, "ema": ema,
                       "nonfinite_streak": np.int32(0)}
        if step >= 2:
            mean = jax.tree.map(lambda *xs: np.mean(np.stack(xs).astype(np.float64), axis=0),
                                *(saved[s][0] for s in range(2, step + 1)))
            train_state["average"] = {"count": np.int32(step - 1),
                                      "mean": jax.tree.map(lambda m: m.astype(np.float32), mean),
                                      "comp": jax.tree.map(lambda m: (m - m.astype(np.float32)).astype(np.float32),
                                                           mean)}
        checkpoint.save(manager, step, train_state, data_state={"next_index": step}, force=True)
    manager.wait_until_finished()
    manager.close()
    (workdir / "config.json").write_text(json.dumps({"model": config, "train": {"seed": 0}}))
    shutil.copyfile(TOKENIZER, workdir / "tokenizer.json")
    return workdir, config, state, saved


def _export(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _torch_names(params, config):
    return CLSP.from_params(params, config).torch_state_dict()


def test_torch_export_has_the_authors_names_and_loads_back(run, tmp_path, capsys):
    workdir, config, state, saved = run
    # Step 1 holds the authors' weights: the export is their state dict, name for name, bit for bit.
    out = tmp_path / "step1" / "clsp.safetensors"
    rc, stdout, err = _export(capsys, "--workdir", workdir, "--out", out, "--format", "torch", "--step", 1)
    assert rc == 0, err
    assert "exported step 1 (weights)" in stdout
    exported = load_file(str(out))
    assert sorted(exported) == sorted(state)
    for name, value in state.items():
        assert exported[name].dtype == np.float32 and exported[name].shape == value.shape, name
        np.testing.assert_array_equal(exported[name], value, err_msg=name)
    beside = json.loads((out.parent / "config.json").read_text())
    assert beside == {"speech": config["speech"], "text": config["text"], "joint_dim": 32}
    assert (out.parent / "tokenizer.json").read_bytes() == TOKENIZER.read_bytes()

    # Imported back, it embeds as the network holding the saved params, and as the authors' network.
    back = CLSP.from_torch(str(out), beside)
    direct = CLSP.from_params(saved[1][0], config)
    data = np.load(FIXTURE)
    feats, lens = data["inputs/features"], data["inputs/feature_lens"]
    ids, mask = data["inputs/input_ids"], data["inputs/attention_mask"]
    for ours, theirs, key in ((back.embed_features(feats, lens), direct.embed_features(feats, lens), "audio"),
                              (back.embed_tokens(ids, mask), direct.embed_tokens(ids, mask), "text")):
        assert np.abs(np.asarray(ours) - np.asarray(theirs)).max() <= 1e-5
        assert np.abs(np.asarray(ours) - data[f"outputs/{key}_embedding"]).max() <= 1e-4
    assert back.logit_scale == pytest.approx(float(data["outputs/logit_scale"]), rel=1e-6)


def test_orbax_export_of_ema_weights_round_trips_through_clsp_load(run, tmp_path, capsys):
    workdir, config, _, saved = run
    out = tmp_path / "export"
    rc, stdout, err = _export(capsys, "--workdir", workdir, "--out", out, "--format", "orbax", "--step", 2, "--ema")
    assert rc == 0 and "exported step 2 (EMA weights)" in stdout, err
    loaded = CLSP.load(out)
    expected = _torch_names(saved[2][1], config)
    got = loaded.torch_state_dict()
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert loaded.tokenizer is not None and loaded.config["speech"] == config["speech"]


def test_average_of_the_last_two_checkpoints_is_their_mean(run, tmp_path, capsys):
    workdir, config, _, saved = run
    out = tmp_path / "avg" / "clsp.safetensors"
    rc, stdout, err = _export(capsys, "--workdir", workdir, "--out", out, "--format", "torch", "--average-last", 2)
    assert rc == 0, err
    assert "exported the average of steps 2, 3 (weights)" in stdout
    mean = jax.tree.map(lambda a, b: np.mean(np.stack([a, b]), axis=0), saved[2][0], saved[3][0])
    expected, got = _torch_names(mean, config), load_file(str(out))
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert not np.allclose(got["logit_scale"], _torch_names(saved[3][0], config)["logit_scale"])


def test_running_average_and_the_average_between_two_steps(run, tmp_path, capsys):
    """The running average as saved (float32 of mean + comp), and --average-between 2 3: the snapshots after
    step 2 up to 3, i.e. step 3's params alone, from (2·A_3 − 1·A_2) / 1 in float64."""
    workdir, config, _, saved = run
    mean23 = jax.tree.map(lambda a, b: (a.astype(np.float64) + b) / 2, saved[2][0], saved[3][0])
    params, _, step = checkpoint.restore_params(str(workdir), averaged=True)
    assert step == 3
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(mean23)):
        assert x.dtype == np.float32
        np.testing.assert_allclose(x, y, rtol=1e-7, atol=1e-9)

    out = tmp_path / "between" / "clsp.safetensors"
    rc, stdout, err = _export(capsys, "--workdir", workdir, "--out", out, "--format", "torch",
                              "--average-between", 2, 3)
    assert rc == 0 and "exported the average between steps 2 and 3 (1 snapshots of the running average)" in stdout, err
    expected, got = _torch_names(saved[3][0], config), load_file(str(out))
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("saved,step,n,expected", [
    ([1, 2, 3], None, 1, [3]), ([3, 1, 2], None, 2, [2, 3]), ([1, 2, 3], 2, 2, [1, 2]), ([5, 10], 5, 1, [5]),
])
def test_select_steps(saved, step, n, expected):
    assert cli.select_steps(saved, step, n) == expected


def test_errors_are_one_line_with_exit_code_2(run, tmp_path, capsys):
    workdir, *_ = run
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"model": {}}))
    (empty / "tokenizer.json").write_text("{}")
    (tmp_path / "a_file").write_text("x")
    cases = [
        (["--workdir", tmp_path / "nope", "--out", tmp_path / "o", "--format", "orbax"], "does not exist"),
        (["--workdir", tmp_path, "--out", tmp_path / "o", "--format", "orbax"], "has no config.json"),
        (["--workdir", empty, "--out", tmp_path / "o", "--format", "orbax"], "has no checkpoints under"),
        (["--workdir", workdir, "--out", tmp_path / "o", "--format", "orbax", "--step", 7],
         "no checkpoint at step 7; saved steps: [1, 2, 3]"),
        (["--workdir", workdir, "--out", tmp_path / "o", "--format", "orbax", "--average-last", 4],
         "--average-last 4: only 3 checkpoint(s) up to step 3 ([1, 2, 3])"),
        (["--workdir", workdir, "--out", tmp_path / "o", "--format", "orbax", "--step", 2, "--average-last", 3],
         "only 2 checkpoint(s) up to step 2"),
        (["--workdir", workdir, "--out", tmp_path / "o.pt", "--format", "torch"], "writes a .safetensors file"),
        (["--workdir", workdir, "--out", tmp_path / "a_file", "--format", "orbax"], "is a file"),
        (["--workdir", workdir, "--out", tmp_path, "--format", "orbax"], "not a CLSP export"),
        (["--workdir", workdir, "--out", workdir / "checkpoints" / "x", "--format", "orbax"],
         "inside the run's checkpoints folder"),
        (["--workdir", workdir, "--out", workdir, "--format", "orbax"], "must not be the work dir"),
        (["--workdir", workdir, "--out", workdir / "m.safetensors", "--format", "torch"], "must not sit in the work dir"),
        (["--workdir", workdir, "--out", tmp_path / "o", "--format", "onnx"], "invalid choice: 'onnx'"),
        (["--workdir", workdir, "--out", tmp_path / "o", "--format", "orbax", "--step", 1, "--ema"],
         "the checkpoint at step 1 has no EMA weights"),
        (["--workdir", workdir, "--out", tmp_path / "o", "--format", "orbax", "--step", 1, "--averaged"],
         "the checkpoint at step 1 has no averaged weights (optim.average_period was off)"),
        (["--workdir", workdir, "--out", tmp_path / "o", "--format", "orbax", "--average-between", 1, 3],
         "the checkpoint at step 1 has no averaged weights"),
        (["--workdir", workdir, "--out", tmp_path / "o", "--format", "orbax", "--average-between", 3, 2],
         "--average-between 3 2: START must be before END"),
        (["--workdir", workdir, "--out", tmp_path / "o", "--format", "orbax", "--average-between", 2, 5],
         "no checkpoint at step 5; saved steps: [1, 2, 3]"),
        (["--workdir", workdir, "--out", tmp_path / "o", "--format", "orbax", "--average-between", 2],
         "argument --average-between: expected 2 arguments"),
        (["--workdir", workdir, "--out", tmp_path / "o", "--format", "orbax", "--averaged", "--ema"],
         "--ema and --averaged exclude each other"),
        (["--workdir", workdir, "--out", tmp_path / "o", "--format", "orbax", "--average-between", 2, 3,
          "--average-last", 2], "--average-last and --average-between exclude each other"),
        (["--workdir", workdir, "--out", tmp_path / "o", "--format", "orbax", "--average-between", 2, 3,
          "--averaged"], "--averaged and --average-between exclude each other"),
        (["--workdir", workdir, "--out", tmp_path / "o", "--format", "orbax", "--average-between", 2, 3,
          "--step", 3], "--average-between START END names its own steps; drop --step"),
    ]
    for argv, message in cases:
        rc, out, err = _export(capsys, *argv)
        assert rc == 2, (argv, out, err)
        assert err.startswith("clsp_jax.export: error: ") and err.count("\n") == 1, err
        assert message in err, (message, err)
    assert not (tmp_path / "o").exists()


def test_from_params_names_what_does_not_fit(run):
    _, config, _, saved = run
    params = jax.tree.map(lambda x: x, saved[1][0])
    params["logit_scale"] = np.zeros(3, np.float32)
    del params["audio_projection"]["0"]["bias"]
    params["spare"] = np.zeros(2, np.float32)
    with pytest.raises(ValueError) as err:
        CLSP.from_params(params, config)
    for message in ("missing audio_projection/0/bias", "unexpected spare", "logit_scale: shape (3,) vs model ()"):
        assert message in str(err.value)
