"""Caption tokenisation with a Hugging Face `tokenizers` tokenizer.json, padded to bucketed lengths.

Bucketed lengths keep the set of compiled shapes small: a batch is padded to the smallest bucket that holds
its longest caption, and captions longer than the largest bucket are truncated (keeping the end token).
"""

from __future__ import annotations

import os

import numpy as np
from etils import epath
from tokenizers import Tokenizer

from clsp_jax import storage  # noqa: F401  (its gcsfs settings, for a gs:// tokenizer.json)

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512)


class CaptionTokenizer:
    """Wraps a tokenizer.json (RoBERTa BPE or BERT WordPiece) with the model's special tokens added.

    Args:
      path: a tokenizer.json file, or a folder holding one; local or a gs:// URL (read through etils.epath).
      buckets: allowed padded lengths, ascending; the last is the maximum (512 for roberta-base).
    """

    def __init__(self, path: str | os.PathLike, buckets=DEFAULT_BUCKETS):
        file = epath.Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {os.fspath(file)}")
        self.path = os.fspath(file)  # as given (relative stays relative), a URL stays a URL
        self.buckets = tuple(sorted(int(b) for b in buckets))
        if not self.buckets or self.buckets[0] < 2:
            raise ValueError(f"token buckets must be lengths >= 2, got {buckets}")
        self.tokenizer = Tokenizer.from_str(file.read_text(encoding="utf-8"))
        self.tokenizer.no_padding()
        self.pad_id = self._pad_id()

    def _pad_id(self) -> int:
        for token in ("<pad>", "[PAD]"):
            tid = self.tokenizer.token_to_id(token)
            if tid is not None:
                return tid
        raise ValueError(f"{self.path} has neither <pad> nor [PAD]")

    @property
    def max_length(self) -> int:
        return self.buckets[-1]

    def bucket(self, length: int) -> int:
        """Smallest bucket >= length (lengths past the largest are truncated to it)."""
        return next((b for b in self.buckets if b >= length), self.buckets[-1])

    def __call__(self, texts: list[str], length: int | None = None) -> dict[str, np.ndarray]:
        """texts -> {"input_ids", "attention_mask"} int32 [len(texts), L].

        L is `length` if given, else the bucket of the longest caption.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of strings")
        # Truncation inside the tokenizer keeps the end token of an over-long caption.
        self.tokenizer.enable_truncation(max_length=length or self.max_length)
        encodings = self.tokenizer.encode_batch(list(texts))
        longest = max((len(e.ids) for e in encodings), default=1)
        length = length or self.bucket(longest)
        ids = np.full((len(texts), length), self.pad_id, np.int32)
        mask = np.zeros((len(texts), length), np.int32)
        for row, enc in enumerate(encodings):
            ids[row, : len(enc.ids)] = enc.ids
            mask[row, : len(enc.ids)] = 1
        return {"input_ids": ids, "attention_mask": mask}
