"""Writing Lhotse MonoCut manifests: build records as plain dicts, write JSONL.gz byte-reproducibly.
(Reading and validating them is clsp_jax.data.manifests.)

Records follow Lhotse's ``MonoCut.to_dict()`` layout (keys in Lhotse's order, ``None`` fields left out), so
``lhotse.CutSet.from_file`` reads what we write (checked with Lhotse 1.33: it re-serialises our records
byte for byte):

    {"id", "start", "duration", "channel", "supervisions": [{"id", "recording_id", "start", "duration",
     "channel", "text", "speaker", "gender", "custom"}], "recording": {"id", "sources": [{"type": "file",
     "channels": [0], "source"}], "sampling_rate", "num_samples", "duration", "channel_ids": [0], ["transforms"]},
     "type": "MonoCut"}

When a file's native rate differs from the manifest rate, the recording carries Lhotse's lazy
``Resample`` transform (as ``Recording.resample`` writes it): ``sampling_rate``/``num_samples`` then describe
the resampled audio and readers must resample the file from ``source_sampling_rate``.
"""

import decimal
import gzip
import io
import json
from collections.abc import Iterable
from pathlib import Path


def resampled_num_samples(num_samples: int, source_rate: int, target_rate: int) -> int:
    """Sample count after resampling, rounded half up as Lhotse's ``compute_num_samples`` does."""
    exact = decimal.Decimal(num_samples) * target_rate / source_rate
    return int(exact.quantize(decimal.Decimal(1), rounding=decimal.ROUND_HALF_UP))


def recording(rec_id: str, source: str, num_samples: int, sampling_rate: int, target_rate: int | None = None,
              num_channels: int = 1) -> dict:
    """A Lhotse Recording dict for an audio file of ``num_samples`` per channel at ``sampling_rate`` Hz.

    ``target_rate`` (e.g. 16000) adds a lazy Resample transform when it differs from the file's rate.
    """
    if num_samples <= 0 or sampling_rate <= 0 or num_channels <= 0:
        raise ValueError(f"recording {rec_id}: num_samples={num_samples}, sampling_rate={sampling_rate}, "
                         f"num_channels={num_channels} must be > 0")
    rec = {
        "id": rec_id,
        "sources": [{"type": "file", "channels": list(range(num_channels)), "source": source}],
        "sampling_rate": sampling_rate,
        "num_samples": num_samples,
        "duration": num_samples / sampling_rate,
        "channel_ids": list(range(num_channels)),
    }
    if target_rate is not None and target_rate != sampling_rate:
        new_samples = resampled_num_samples(num_samples, sampling_rate, target_rate)
        rec.update(sampling_rate=target_rate, num_samples=new_samples, duration=new_samples / target_rate)
        rec["transforms"] = [{
            "name": "Resample",
            "kwargs": {"source_sampling_rate": sampling_rate, "target_sampling_rate": target_rate},
        }]
    return rec


def mono_cut(cut_id: str, rec: dict, *, start: float = 0, duration: float | None = None, text: str = "",
             speaker: str | None = None, gender: str | None = None, custom: dict | None = None) -> dict:
    """A MonoCut dict over channel 0 of ``rec`` (seconds ``start`` .. ``start + duration``, default the whole
    recording) with one supervision spanning the cut; ``custom`` holds labels and captions."""
    if duration is None:
        duration = rec["duration"] - start
    if start < 0 or duration <= 0 or start + duration > rec["duration"] + 1e-6:
        raise ValueError(f"cut {cut_id}: [{start}, {start + duration}] s outside recording of {rec['duration']} s")
    sup = {"id": cut_id, "recording_id": rec["id"], "start": 0, "duration": duration, "channel": 0, "text": text}
    if speaker is not None:
        sup["speaker"] = speaker
    if gender is not None:
        sup["gender"] = gender
    if custom is not None:
        sup["custom"] = custom
    return {"id": cut_id, "start": start, "duration": duration, "channel": 0, "supervisions": [sup],
            "recording": rec, "type": "MonoCut"}


def write_jsonl_gz(path: str | Path, cuts: Iterable[dict]) -> int:
    """Write one JSON object per line, gzip-compressed with a fixed header (mtime 0, no file name), so the
    same records always give the same bytes. Returns the number of records written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        with io.TextIOWrapper(gz, encoding="utf-8", newline="\n") as f:
            for cut in cuts:
                f.write(json.dumps(cut, ensure_ascii=False) + "\n")
                count += 1
    return count
