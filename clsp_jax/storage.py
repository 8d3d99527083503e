"""Local paths and `gs://` URLs for work dirs, data dirs and tokenizers, through `etils.epath`.

Work dirs and data dirs may be local folders or URLs: code that makes a path absolute uses `resolve`, so a
URL stays a URL (`os.path.abspath("gs://b/run")` would turn it into a local folder named "gs:"), and code
that branches on the kind of path uses `is_remote`. `etils.epath` reaches `gs://` through gcsfs; Orbax's array data goes through
tensorstore and TFDS's ArrayRecord shards through ArrayRecord's own GCS client, both given the same URL.

Importing this module turns gcsfs's directory-listing cache off (see `_no_gcs_listing_cache`): every module
that touches a `gs://` path imports it, before the first filesystem object is made.
"""

from __future__ import annotations

import os

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is a URL (gs://..., s3://...) rather than a local path."""
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path: a URL as given, a local path made absolute (against the current folder)."""
    return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(os.fspath(path)))


def upload_tree(local: str | os.PathLike, target: str | os.PathLike) -> list[epath.Path]:
    """Copies every file under the local folder `local` to the same relative path under `target` (a local
    folder or a URL), whole, overwriting; returns the files written.

    GCS objects cannot be appended to, so files that grow (metrics.jsonl, TensorBoard events) are staged
    locally and uploaded whole with this. The walk is local (`os.walk`): epath's `rglob` refuses the
    recursive pattern even on local paths."""
    local, target = os.fspath(local), epath.Path(target)
    written = []
    for folder, _, names in os.walk(local):
        relative = os.path.relpath(folder, local)
        destination = target if relative == "." else target / relative
        destination.mkdir(parents=True, exist_ok=True)
        for name in sorted(names):
            with open(os.path.join(folder, name), "rb") as f:
                (destination / name).write_bytes(f.read())
            written.append(destination / name)
    return written


def _no_gcs_listing_cache() -> None:
    """Makes gcsfs filesystems list directories afresh each time.

    gcsfs otherwise keeps every listing (names and sizes) for the life of the process, and etils.epath keeps
    one filesystem per process: an object rewritten by another writer (tensorstore inside Orbax, another
    host, a resumed run) would then be read back at its old size, and a checkpoint another host finished
    would look absent. The setting is fsspec's per-protocol default for new filesystem objects; an explicit
    `FSSPEC_GCS` setting of the same key is overridden (the cache is never safe here)."""
    import fsspec.config

    fsspec.config.conf.setdefault("gcs", {})["use_listings_cache"] = False


_no_gcs_listing_cache()
