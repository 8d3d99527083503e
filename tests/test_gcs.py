"""`gs://` work dirs and data dirs against a local GCS emulator (tests/gcs_emulator.py): Orbax checkpoints
(tensorstore for arrays, etils.epath/gcsfs for directories and metadata), epath text files, TensorBoard events
(tensorboardX's own google-cloud-storage writer) and the ArrayRecord / TFDS / Grain readers.

Several tests pin what the libraries do today rather than what we would like (gcsfs's append mode overwrites,
ArrayRecordWriter cannot write gs://): they fail when that changes, so the trainer's workarounds can be revisited.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from gcs_emulator import event_steps
from train_fixtures import fake_devices_env

from clsp_jax import storage


def _orbax_manager(directory, keep: int = 2):
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as policies

    options = ocp.CheckpointManagerOptions(preservation_policy=policies.LatestN(n=keep),
                                           enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(epath.Path(directory), options=options, item_names=("state", "data"))


def _state(step: int, sharding) -> dict:
    """A train-state-like pytree: a step scalar, a [8, 4] float32 matrix sharded on its rows, a [3] vector."""
    w = jax.device_put(jnp.arange(32, dtype=jnp.float32).reshape(8, 4) + step, sharding)
    return {"step": jnp.asarray(step, jnp.int32), "params": {"w": w, "b": jnp.full((3,), float(step))}}


def test_orbax_round_trip(gcs_path):
    """Async saves of (sharded state, JSON) to gs://, keep-2 deletes the oldest, a new manager (a resume) lists
    and restores the latest into the requested shardings."""
    import orbax.checkpoint as ocp
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    directory = gcs_path / "run" / "checkpoints"

    manager = _orbax_manager(directory, keep=2)
    for step in (1, 2, 3):
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_state(step, rows)),
                                                   data=ocp.args.JsonSave({"position": step * 10})))
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 3]
    assert manager.latest_step() == 3
    manager.close()
    assert sorted(p.name for p in directory.iterdir()) == ["2", "3"]  # step 1 deleted, no temporary dirs left

    resumed = _orbax_manager(directory, keep=2)
    assert resumed.all_steps() == [2, 3] and resumed.latest_step() == 3
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(0, rows))
    restored = resumed.restore(3, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                         data=ocp.args.JsonRestore()))
    resumed.close()
    expected = _state(3, rows)
    assert restored["data"] == {"position": 30}
    assert restored["state"]["params"]["w"].sharding == rows
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored["state"], expected)


_CHILD_SAVE = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, orbax.checkpoint as ocp
    from etils import epath
    from jax.sharding import AxisType, NamedSharding, PartitionSpec
    assert jax.device_count() == 4, jax.devices()
    mesh = jax.make_mesh((2, 2), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    blocks = NamedSharding(mesh, PartitionSpec("data", "fsdp"))
    w = jax.device_put(jnp.arange(32, dtype=jnp.float32).reshape(8, 4), blocks)
    with ocp.CheckpointManager(epath.Path(sys.argv[1]), item_names=("state", "data")) as manager:
        manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": w}),
                                                data=ocp.args.JsonSave({"position": 70})))
        manager.wait_until_finished()
""")


def test_orbax_child_process_save_restores_here(gcs, gcs_path):
    """A child process on a 2x2 mesh of 4 CPU devices, pointed at the emulator only through `gcs.env`, saves;
    this process (its own devices) restores the arrays whole: a checkpoint moves between topologies via gs://."""
    import orbax.checkpoint as ocp
    from jax.sharding import SingleDeviceSharding

    directory = gcs_path / "checkpoints"
    env = fake_devices_env(4, {**os.environ, **gcs.env})
    proc = subprocess.run([sys.executable, "-c", _CHILD_SAVE, os.fspath(directory)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    with ocp.CheckpointManager(directory, item_names=("state", "data")) as manager:
        assert manager.latest_step() == 7
        one = SingleDeviceSharding(jax.devices()[0])
        target = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=one)}
        restored = manager.restore(7, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                             data=ocp.args.JsonRestore()))
    np.testing.assert_array_equal(np.asarray(restored["state"]["w"]), np.arange(32, dtype=np.float32).reshape(8, 4))
    assert restored["data"] == {"position": 70}


def test_epath_text_files(gcs_path):
    """What the trainer does with config.json and friends: mkdir, write, read, exists, glob, rename, delete.
    On gcsfs, rename refuses an existing target (os.rename would overwrite): use `replace` for that."""
    run = gcs_path / "run"
    run.mkdir(parents=True, exist_ok=True)
    config = run / "config.json"
    assert not config.exists()
    config.write_text('{"model": {"joint_dim": 32}}')
    (run / "tokenizer.json").write_bytes(b"{}")
    assert config.exists() and config.read_text() == '{"model": {"joint_dim": 32}}'
    assert run.exists() and run.is_dir()
    assert sorted(p.name for p in run.glob("*.json")) == ["config.json", "tokenizer.json"]

    config.rename(run / "config.old.json")
    assert not config.exists() and (run / "config.old.json").read_text().startswith('{"model"')
    config.write_text("new")
    with pytest.raises(FileExistsError):
        config.rename(run / "config.old.json")
    config.replace(run / "config.old.json")
    assert (run / "config.old.json").read_text() == "new" and not config.exists()

    run.rmtree()
    assert not run.exists()


def test_epath_append_mode_overwrites(gcs_path):
    """GCS objects are immutable: gcsfs's mode "a" warns and starts the object over, so an append-only
    metrics.jsonl on gs:// must be written whole (or kept locally and uploaded)."""
    metrics = gcs_path / "metrics.jsonl"
    for step in (1, 2):
        with pytest.warns(UserWarning, match="Append mode"), metrics.open("a") as f:
            f.write(f'{{"step": {step}}}\n')
    assert metrics.read_text() == '{"step": 2}\n'


_CHILD_TENSORBOARD = textwrap.dedent("""
    import sys
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(sys.argv[1])
    for step in range(20):
        writer.add_scalar("train/loss", 1.0 / (step + 1), step)
    writer.flush()
    for step in range(20, 40):
        writer.add_scalar("train/loss", 1.0 / (step + 1), step)
    writer.close()
""")


def test_tensorboardx_writes_gs(gcs, gcs_path):
    """tensorboardX writes gs:// without TensorFlow (google-cloud-storage, uploading the whole file on each
    flush): every scalar of flushes before and after the first upload is in the object.

    The writer runs in a child process because tensorboardX keeps every SummaryWriter alive (an atexit hook) and
    its GCS writer uploads once more when collected at interpreter exit: in the pytest process that would be
    after the emulator stopped, and google-cloud-storage retries for two minutes.
    """
    logdir = gcs_path / "tensorboard"
    proc = subprocess.run([sys.executable, "-c", _CHILD_TENSORBOARD, os.fspath(logdir)],
                          env={**os.environ, **gcs.env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (events,) = list(logdir.iterdir())
    assert events.name.startswith("events.out.tfevents.")
    assert event_steps(events.read_bytes()) == list(range(40))


def _write_tiny_tfds(local_dir: str, name: str, n: int) -> None:
    """A TFDS dataset `name` (version 1.0.0, split "train", one ArrayRecord shard, n examples {"id": "c<i>",
    "x": i}) under `local_dir`, written without TensorFlow as the FCaps builder writes its shards."""
    import tensorflow_datasets as tfds
    from array_record.python.array_record_module import ArrayRecordWriter
    from tensorflow_datasets.core import example_serializer

    bdir = epath.Path(local_dir) / name / "1.0.0"
    bdir.mkdir(parents=True)
    features = tfds.features.FeaturesDict({"id": tfds.features.Text(), "x": tfds.features.Scalar(dtype=np.int32)})
    serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
    template = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
    writer = ArrayRecordWriter(os.fspath(bdir / f"{name}-train.array_record-00000-of-00001"), "group_size:1")
    for i in range(n):
        example = features.encode_example({"id": f"c{i}", "x": i})
        writer.write(serializer.get_tf_example(example).SerializeToString())
    writer.close()
    shards = tfds.core.ShardedFileTemplate(data_dir=bdir, template=template, dataset_name=name, split="train",
                                           filetype_suffix="array_record")
    split = tfds.core.SplitInfo(name="train", shard_lengths=[n], num_bytes=0, filename_template=shards)
    tfds.folder_dataset.write_metadata(data_dir=bdir, features=features, split_infos=[split],
                                       filename_template=template, check_data=False)


def test_array_record_reads_gs(gcs_path):
    """The installed ArrayRecord reader opens gs:// itself (google-cloud-cpp inside array_record, pointed at the
    emulator by CLOUD_STORAGE_EMULATOR_ENDPOINT); its writer does not (gs:// is taken as a local path)."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    records = [b"record %d" % i for i in range(5)]
    with tempfile.TemporaryDirectory() as tmp:
        writer = ArrayRecordWriter(os.path.join(tmp, "x.array_record"), "group_size:1")
        for r in records:
            writer.write(r)
        writer.close()
        remote = gcs_path / "x.array_record"
        remote.write_bytes(epath.Path(tmp, "x.array_record").read_bytes())

    reader = ArrayRecordReader(os.fspath(remote))
    assert reader.num_records() == len(records)
    assert reader.read_all() == records
    assert reader.read([3]) == [records[3]]
    reader.close()

    writer = ArrayRecordWriter(os.fspath(gcs_path / "y.array_record"), "group_size:1")
    with pytest.raises(RuntimeError, match="open\\(\\) failed: No such file or directory"):
        writer.write(b"x")


def test_tfds_and_grain_read_gs_data_dir(gcs_path):
    """tfds.data_source on a gs:// data dir (metadata through epath, shards through ArrayRecord) and Grain's
    ArrayRecordDataSource on the gs:// shard read the examples written locally."""
    import grain

    with tempfile.TemporaryDirectory() as tmp:
        _write_tiny_tfds(tmp, "tiny", n=6)
        storage.upload_tree(tmp, gcs_path)

    import tensorflow_datasets as tfds

    source = tfds.data_source("tiny", data_dir=os.fspath(gcs_path), split="train")
    assert len(source) == 6
    assert [source[i]["x"] for i in range(6)] == list(range(6))
    assert source[4]["id"] == b"c4"

    (shard,) = (gcs_path / "tiny" / "1.0.0").glob("tiny-train.array_record-*")
    records = grain.sources.ArrayRecordDataSource([os.fspath(shard)])
    assert len(records) == 6 and isinstance(records[0], bytes)


_CHILD_REWRITE = textwrap.dedent("""
    import sys
    if sys.argv[2] == "import":
        import clsp_jax.storage  # noqa: F401
    from etils import epath
    from google.cloud import storage
    path = epath.Path(sys.argv[1])
    path.write_text("v1")
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # a listing, cached unless turned off
    bucket, name = sys.argv[1][len("gs://"):].split("/", 1)
    storage.Client().bucket(bucket).blob(name).upload_from_string(b"version 2")  # another writer
    print(path.read_text())
""")


def test_importing_storage_turns_the_gcsfs_listing_cache_off(gcs, gcs_path):
    """An object rewritten by another client after a listing: gcsfs's listing cache reads it at its old size;
    importing clsp_jax.storage (as every module that touches gs:// does) turns the cache off. The children get
    the emulator's anonymous token without its own cache setting."""
    env = {**os.environ, **gcs.env, "FSSPEC_GCS": json.dumps({"token": "anon"})}
    read = {}
    for mode in ("plain", "import"):
        proc = subprocess.run([sys.executable, "-c", _CHILD_REWRITE, os.fspath(gcs_path / mode / "x.txt"), mode],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        read[mode] = proc.stdout.strip()
    assert read == {"plain": "ve", "import": "version 2"}
