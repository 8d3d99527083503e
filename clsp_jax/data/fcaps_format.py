"""The FCaps TFDS dataset on disk: features, file layout, metadata. Written and read without TensorFlow.

Layout under ``data_dir`` (the TFDS convention, so ``tfds.data_source(name, data_dir=data_dir,
split=split)`` opens it)::

    <data_dir>/<name>/1.0.0/dataset_info.json, features.json
    <data_dir>/<name>/1.0.0/<name>-<split>.array_record-00000-of-00012      ArrayRecord shards
    <data_dir>/<name>/1.0.0/<name>-<split>.num_samples.npy                  int32 [num_examples]
    <data_dir>/<name>/1.0.0/reports/<split>/rejects.jsonl, summary.json

The ``num_samples`` sidecar (record order = split order) lets the input pipeline plan duration
buckets without reading audio.

Waveforms are stored as **int16** PCM at 16 kHz: half the bytes of float32 (FCaps-Emilia is 46.8k
hours: ~5.4 TB as int16 vs ~10.8 TB as float32), and lossless for the 16-bit sources FCaps audio
comes from; the quantisation noise of resampled audio (-96 dB) is far below anything the model
sees. ``to_int16`` stores a waveform; the pipeline converts back to float32 / 32768.

Written by ``python -m data_prep.prepare``; read by the input pipeline (clsp_jax.data.pipeline) and the
evaluation. A prepared data dir can be read from a ``gs://`` URL (metadata through etils.epath and gcsfs,
shards through ArrayRecord's own GCS reader); the writer needs a local folder (ArrayRecord cannot write
``gs://``): prepare locally, then copy it to the bucket.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import example_serializer

from clsp_jax import storage

# A local data dir's paths are pathlib paths, a URL's are etils.epath paths (pathlib would turn gs://b into
# gs:/b); both have pathlib's methods, except that epath refuses recursive globs.
Path = pathlib.Path | epath.Path

DEFAULT_NAME = "fcaps"
VERSION = "1.0.0"
SAMPLE_RATE = 16000
FILE_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
TAG_FIELDS = ("accent", "pitch", "speaking_rate", "gender")
TAG_LIST_FIELDS = ("intrinsic_tags", "situational_tags")


def features() -> tfds.features.FeaturesDict:
    """One example per clip. Strings decode to bytes, string lists to lists of bytes."""
    text = tfds.features.Text
    return tfds.features.FeaturesDict(
        {
            "id": text(),
            # Tensor, not Audio (Audio needs TensorFlow). BYTES stores the raw PCM: the default
            # (one int64 varint per sample) is several times larger and far slower to decode.
            "waveform": tfds.features.Tensor(shape=(None,), dtype=np.int16, encoding=tfds.features.Encoding.BYTES),
            "num_samples": tfds.features.Scalar(dtype=np.int32),
            "duration": tfds.features.Scalar(dtype=np.float32),  # seconds = num_samples / 16000
            "global_captions": tfds.features.Sequence(text()),
            "finegrained_captions": tfds.features.Sequence(text()),  # sorted by length
            "tags": {
                **{k: text() for k in TAG_FIELDS},
                **{k: tfds.features.Sequence(text()) for k in TAG_LIST_FIELDS},
            },
            "speaker": text(),
        }
    )


class ExampleSerializer:
    """Example dict -> tf.train.Example bytes, deterministically.

    TFDS's own ``serialize_example`` writes the proto's feature map in an order that changes
    between processes; map entries sorted by key make a rebuilt shard byte-identical.
    """

    def __init__(self):
        self._features = features()
        self._serializer = example_serializer.ExampleSerializer(self._features.get_serialized_info())

    def __call__(self, example: dict) -> bytes:
        proto = self._serializer.get_tf_example(self._features.encode_example(example))
        return proto.SerializeToString(deterministic=True)


def to_int16(x: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> int16 PCM (rounded, saturating: resampling can overshoot full scale)."""
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


def builder_dir(data_dir: str | os.PathLike, name: str = DEFAULT_NAME) -> Path:
    """``<data_dir>/<name>/<VERSION>``: a pathlib.Path for a local data dir, an etils.epath.Path for a URL."""
    root = epath.Path(data_dir) if storage.is_remote(data_dir) else pathlib.Path(data_dir)
    return root / name / VERSION


def shard_name(name: str, split: str, index: int, count: int) -> str:
    return f"{name}-{split}.array_record-{index:05d}-of-{count:05d}"


def num_samples_path(bdir: Path, name: str, split: str) -> Path:
    return bdir / f"{name}-{split}.num_samples.npy"


def reports_dir(bdir: Path, split: str) -> Path:
    return bdir / "reports" / split


def split_shard_files(bdir: Path, name: str, split: str) -> list[Path]:
    return sorted(bdir.glob(f"{name}-{split}.array_record-*"))


@contextlib.contextmanager
def metadata_lock(bdir: Path):
    """Serialises metadata updates of concurrent builds of different splits into one directory."""
    bdir.mkdir(parents=True, exist_ok=True)
    with open(bdir / ".metadata.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def existing_splits(bdir: Path) -> dict[str, dict]:
    """Split name -> {"shardLengths": [...], "numBytes": n} from dataset_info.json (or {})."""
    info = bdir / "dataset_info.json"
    if not info.exists():
        return {}
    splits = json.loads(info.read_text()).get("splits", [])
    return {
        s["name"]: {"shardLengths": [int(n) for n in s["shardLengths"]], "numBytes": int(s.get("numBytes", 0))}
        for s in splits
    }


def write_metadata(bdir: Path, name: str, splits: dict[str, dict]) -> None:
    """(Re)writes dataset_info.json + features.json for ``splits`` (call under metadata_lock)."""
    split_infos = [
        tfds.core.SplitInfo(
            name=split,
            shard_lengths=s["shardLengths"],
            num_bytes=s["numBytes"],
            filename_template=tfds.core.ShardedFileTemplate(
                data_dir=bdir,
                template=FILE_TEMPLATE,
                dataset_name=name,
                split=split,
                filetype_suffix="array_record",
            ),
        )
        for split, s in sorted(splits.items())
    ]
    tfds.folder_dataset.write_metadata(
        data_dir=bdir,
        features=features(),
        split_infos=split_infos,
        filename_template=FILE_TEMPLATE,
        check_data=False,
        description="FCaps clips with global and fine-grained speaking-style captions (clsp-jax).",
    )


def open_split(data_dir: str | os.PathLike, split: str, name: str = DEFAULT_NAME):
    """Random-access data source of decoded examples (dicts of numpy / bytes)."""
    return tfds.data_source(name, data_dir=os.fspath(data_dir), split=split)


def load_num_samples(data_dir: str | os.PathLike, split: str, name: str = DEFAULT_NAME) -> np.ndarray:
    """int32 [num_examples] sample counts of a split, from the sidecar written at preparation."""
    path = num_samples_path(builder_dir(data_dir, name), name, split)
    if not path.exists():
        raise ValueError(
            f"{path} is missing: prepare the split with data_prep.prepare (it writes the "
            "num_samples sidecar the pipeline plans duration buckets with)"
        )
    with path.open("rb") as f:  # np.load of a path string reads local files only
        return np.load(f)
