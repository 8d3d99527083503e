"""Embed audio files and captions with a CLSP checkpoint; write the embeddings and their similarities.

    python -m clsp_jax.embed --checkpoint clsp_export --audio a.wav b.flac \
        --text "A male speaker." "A female speaker in a happy tone." --out embeddings
    python -m clsp_jax.embed --checkpoint out/clsp.safetensors --audio-list files.txt --text-file captions.txt \
        --out embeddings

`--checkpoint`: a `CLSP.save` folder (`python -m clsp_jax.export --format orbax`), or a `.safetensors` file
under the authors' PyTorch names with `config.json` and `tokenizer.json` beside it (`--format torch`, or
the authors' own weights converted to safetensors).

Audio: whatever soundfile (or audioread) decodes, at any sample rate and channel count. Channels are
averaged to mono (as the training data preparation does), then resampled to 16 kHz (soxr HQ).
`--audio-list`: one path per line (blank lines and lines starting with `#` skipped), relative paths taken
from the list's folder. `--text-file`: one caption per line (blank lines skipped).

Long audio: a file longer than `--max-audio-seconds` (default 30, the longest clips the authors trained on)
is cut into the fewest equal-length windows of at most that length; its embedding is the mean of the
windows' embeddings, L2-normalised again (`clsp_jax.inference`). Memory on the device depends on
`--batch-size` and that maximum, not on the files' lengths.

Writes into OUT (rows in the order of the inputs, failed files left out):

    audio_embeddings.npy   float32 [A, D] unit vectors; audio_files.txt names the rows
    text_embeddings.npy    float32 [T, D] unit vectors; texts.txt holds the rows
    similarity.npy         float32 [A, T] audio x text dot products (cosines; times exp(logit_scale) = logits)
    failed_audio.txt       "path<TAB>reason" per file that could not be embedded (only when some failed)

and prints the similarity table. Unreadable files and files shorter than 80 ms are reported, counted and
skipped; so are empty (or blank) `--text` captions, in one line, and the other inputs are still embedded.
Exit code 2 for bad arguments, or when nothing could be embedded.
"""

from __future__ import annotations

import collections
import sys
import time
from pathlib import Path

import numpy as np

from clsp_jax import cli
from clsp_jax.evals import sources
from clsp_jax.inference import CLSP, MAX_AUDIO_SECONDS, max_audio_samples

# The printed table shows at most this many audio rows (all of them are in similarity.npy).
MAX_TABLE_ROWS = 50


def _parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog="python -m clsp_jax.embed", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="a CLSP.save folder, or a .safetensors file with config.json + tokenizer.json beside it")
    audio = p.add_mutually_exclusive_group()
    audio.add_argument("--audio", nargs="+", metavar="FILE", help="audio files")
    audio.add_argument("--audio-list", metavar="TXT", help="a text file with one audio path per line")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--text", nargs="+", metavar="CAPTION", help="captions")
    text.add_argument("--text-file", metavar="TXT", help="a text file with one caption per line")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=16, help="clips (and captions) per forward pass")
    p.add_argument("--max-audio-seconds", type=float, default=MAX_AUDIO_SECONDS,
                   help="longer files are embedded as the mean of windows of at most this length (seconds)")
    return p


def _lines(path: str, what: str) -> list[str]:
    if not Path(path).is_file():
        raise ValueError(f"{what} {path} does not exist")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def audio_paths(args) -> list[str]:
    if args.audio:
        return list(args.audio)
    if not args.audio_list:
        return []
    root = Path(args.audio_list).parent
    return [p if Path(p).is_absolute() else str(root / p)
            for p in _lines(args.audio_list, "--audio-list") if not p.startswith("#")]


def texts(args) -> tuple[list[str], str | None]:
    """-> (the non-empty captions, in order; a line refusing the empty `--text` ones, or None)."""
    if args.text_file:
        return _lines(args.text_file, "--text-file"), None
    found = list(args.text or [])
    if any("\n" in t or "\r" in t for t in found):
        raise ValueError("--text captions must be single lines (texts.txt holds one per line)")
    empty = [str(i) for i, t in enumerate(found, 1) if not t.strip()]
    refused = None
    if empty:
        refused = (f"--text caption {empty[0]} is empty" if len(empty) == 1 else
                   f"--text captions {', '.join(empty)} are empty") + ": refused (a caption must describe the voice)"
    return [t for t in found if t.strip()], refused


def _progress(what: str, done: int, total: int, started: float) -> None:
    print(f"{what}: {done}/{total} ({time.time() - started:.1f} s)", file=sys.stderr, flush=True)


def embed_audio_files(model: CLSP, paths: list[str], batch_size: int, max_seconds: float = MAX_AUDIO_SECONDS
                      ) -> tuple[np.ndarray, np.ndarray, dict]:
    """-> (embeddings float32 [len(paths), D] (zeros where failed), embedded bool [len(paths)],
    failures {path: "reason: detail"}). Files are batched by length (sources.WaveformBatches); files longer
    than `max_seconds` are embedded in windows (`CLSP.embed_audio`) and counted on stderr."""
    # No more rows than files: a batch pads every row to its longest file, so filler rows beside a long
    # file would cost as much host memory as copies of it.
    batches = sources.WaveformBatches([sources.audio_file_clip(p) for p in paths], min(batch_size, len(paths)))
    emb = np.zeros((len(paths), model.config["joint_dim"]), np.float32)
    embedded = np.zeros(len(paths), bool)
    started, done, windowed, limit = time.time(), 0, 0, max_audio_samples(max_seconds)
    for batch in batches:
        rows = batch["valid"]
        if rows.any():
            emb[batch["index"][rows]] = model.embed_audio(batch["audio"], batch["audio_lens"],
                                                          max_seconds=max_seconds)[rows]
            embedded[batch["index"][rows]] = True
            windowed += int(np.sum(batch["audio_lens"][rows] > limit))
        done += int((batch["index"] >= 0).sum())
        _progress("audio files", done, len(paths), started)
    if windowed:
        print(f"{windowed} audio file(s) longer than {max_seconds:g} s embedded as the mean of windows of at most "
              f"{max_seconds:g} s", file=sys.stderr)
    failures = {p: batches.failures[p] for p, ok in zip(paths, embedded) if not ok}
    return emb, embedded, failures


def embed_texts(model: CLSP, captions: list[str], batch_size: int) -> np.ndarray:
    """-> float32 [len(captions), D]."""
    out, started = [], time.time()
    for start in range(0, len(captions), batch_size):
        out.append(model.embed_text(captions[start:start + batch_size]))
        _progress("captions", start + len(out[-1]), len(captions), started)
    return np.concatenate(out)


def similarity_table(names: list[str], captions: list[str], sim: np.ndarray) -> str:
    """Rows = audio files (name, one column per caption, the best caption's column), then a caption legend."""
    width = max(8, *(len(Path(n).name) for n in names[:MAX_TABLE_ROWS]))
    cols = [f"t{j}" for j in range(len(captions))]
    lines = [f"{'audio':<{width}} " + " ".join(f"{c:>7}" for c in cols) + "   best"]
    for name, row in list(zip(names, sim))[:MAX_TABLE_ROWS]:
        lines.append(f"{Path(name).name:<{width}} " + " ".join(f"{v:7.3f}" for v in row)
                     + f"   {cols[int(np.argmax(row))]}")
    if len(names) > MAX_TABLE_ROWS:
        lines.append(f"... {len(names) - MAX_TABLE_ROWS} more rows in similarity.npy")
    lines += [""] + [f"{c}: {t}" for c, t in zip(cols, captions)]
    return "\n".join(lines) + "\n"


def _check_out(out: Path) -> None:
    """Raises ValueError unless `out` is, or can be made, a folder (checked before any embedding is spent)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file")
    existing = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file")


def write_outputs(out: Path, paths: list[str], audio_emb: np.ndarray, embedded: np.ndarray, failures: dict,
                  captions: list[str], text_emb: np.ndarray | None) -> None:
    """Writes the files of the module doc into `out`; prints the skipped files, the table and a summary line."""
    out.mkdir(parents=True, exist_ok=True)
    kept = [p for p, ok in zip(paths, embedded) if ok]
    if paths:
        np.save(out / "audio_embeddings.npy", audio_emb[embedded])
        (out / "audio_files.txt").write_text("".join(p + "\n" for p in kept), encoding="utf-8")
        if failures:
            (out / "failed_audio.txt").write_text("".join(f"{p}\t{r}\n" for p, r in failures.items()),
                                                  encoding="utf-8")
            reasons = collections.Counter(r.split(":")[0] for r in failures.values())
            print(f"skipped {len(failures)} of {len(paths)} audio files ("
                  + ", ".join(f"{r} {n}" for r, n in sorted(reasons.items())) + f"); see {out / 'failed_audio.txt'}",
                  file=sys.stderr)
    if captions:
        np.save(out / "text_embeddings.npy", text_emb)
        (out / "texts.txt").write_text("".join(t + "\n" for t in captions), encoding="utf-8")
    if kept and captions:
        sim = audio_emb[embedded] @ text_emb.T
        np.save(out / "similarity.npy", sim)
        print(similarity_table(kept, captions, sim), end="")
    counts = ([f"{len(kept)} audio file(s)"] if paths else []) + ([f"{len(captions)} caption(s)"] if captions else [])
    print(f"embedded {' and '.join(counts)} into {out}")


def main(argv: list[str] | None = None) -> int:
    """The CLI (see the module doc); returns the exit code."""
    try:
        args = _parser().parse_args(argv)
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        max_audio_samples(args.max_audio_seconds, "--max-audio-seconds")
        paths, (captions, refused) = audio_paths(args), texts(args)
        if not paths and not captions:
            raise ValueError(f"nothing to embed: {refused}" if refused else
                             "nothing to embed: give --audio / --audio-list and/or --text / --text-file")
        out = Path(args.out)
        _check_out(out)
        model = cli.load_model(args.checkpoint)
        if captions and model.tokenizer is None:
            raise ValueError(f"--checkpoint {args.checkpoint} has no tokenizer.json: cannot embed text")
        if refused:
            print(f"clsp_jax.embed: {refused}", file=sys.stderr)
        audio_emb, embedded, failures = None, np.zeros(0, bool), {}
        if paths:
            audio_emb, embedded, failures = embed_audio_files(model, paths, args.batch_size, args.max_audio_seconds)
            if not embedded.any():
                raise ValueError(f"none of the {len(paths)} audio files could be embedded; first failure: "
                                 f"{next(iter(failures.items()))}")
        text_emb = embed_texts(model, captions, args.batch_size) if captions else None
        write_outputs(out, paths, audio_emb, embedded, failures, captions, text_emb)
    except (ValueError, OSError) as e:
        return cli.usage_error("clsp_jax.embed", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
