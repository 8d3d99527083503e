"""Cached [CLS] states of a frozen text encoder, so training runs it once per caption, not once per step.

When the text encoder's embeddings and layers are frozen (only its pooler and the heads train), its
last-layer [CLS] state is a fixed function of the caption. `TextStateCache.build` computes it once for
every caption of the training sources (in eval mode: frozen layers run without dropout, as in
locked-tower tuning) and the trainer sends `text_states` [B, C, H] to the step in place of the tokens.
That removes the text forward from every step (the speed-up of the demo's step is in BENCHMARKS.md §1).

It applies when every caption a batch can hold is known in advance: stages 1 and 2 (stage 3's rewritten
negatives are made on the fly) and a text encoder frozen up to its pooler (`check_cacheable`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from clsp_jax.models.text import TextEncoder
from clsp_jax.optim import training_paths
from clsp_jax.tokenizer import CaptionTokenizer

log = logging.getLogger(__name__)


def check_cacheable(param_paths: Sequence[str], frozen: Sequence[str], stage: int) -> None:
    """Raises ValueError unless every text-encoder parameter below the pooler is frozen and the stage's
    captions all come from the data (not stage 3)."""
    if stage == 3:
        raise ValueError("stage 3's hard negatives are rewritten on the fly, so their states cannot be cached")
    below_pooler = [p for p in param_paths if p.startswith("text_encoder/") and not p.startswith("text_encoder/pooler/")]
    training = training_paths(below_pooler, frozen)
    if not below_pooler or training:
        raise ValueError("caching text states needs the text encoder frozen below its pooler (optim.frozen); "
                         f"these train: {training[:3] or 'no text encoder parameters found'}")


def _key(ids: np.ndarray, mask: np.ndarray) -> bytes:
    return np.asarray(ids[mask.astype(bool)], np.int32).tobytes()


class TextStateCache:
    """caption tokens -> last-layer [CLS] state [H] float32 of a frozen text encoder.

    Keys are the unpadded token ids, so a batch tokenized at any padded length finds its rows.
    """

    def __init__(self, states: np.ndarray, index: dict[bytes, int]):
        self.states, self.index = states, index

    def __len__(self) -> int:
        return len(self.index)

    @classmethod
    def build(cls, encoder: TextEncoder, tokenizer: CaptionTokenizer, captions: Iterable[str], *,
              length: int | None = None, batch_size: int = 64, lengths=(32, 64, 128, 256, 512)) -> "TextStateCache":
        """Runs `encoder` (eval mode) over the distinct `captions`, tokenized as the pipeline does (truncated to
        `length`, default the tokenizer's maximum). Batches are sorted by length and padded to the smallest of
        `lengths` (and `length`) that fits, so few shapes compile and little padding is computed."""
        start = time.time()
        length = length or tokenizer.max_length
        tokens = tokenizer(sorted(set(captions)), length=length)
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        first_row: dict[bytes, int] = {}  # captions that tokenize alike (e.g. truncated) share a row
        for row in range(len(ids)):
            first_row.setdefault(_key(ids[row], mask[row]), row)
        index = {key: n for n, key in enumerate(first_row)}
        rows = np.fromiter(first_row.values(), int, len(first_row))
        ids, mask = ids[rows], mask[rows]
        order = np.argsort(mask.sum(1), kind="stable")
        pads = sorted({min(p, length) for p in lengths} | {length})

        @nnx.jit
        def cls_states(encoder, ids, mask):
            return encoder.cls_state(ids, mask).astype(jnp.float32)

        states = np.zeros((len(ids), encoder.output_dim), np.float32)
        for lo in range(0, len(order), batch_size):
            chunk = order[lo: lo + batch_size]
            longest = int(mask[chunk].sum(1).max())
            pad = next(p for p in pads if p >= longest)
            b_ids = np.zeros((batch_size, pad), np.int32)
            b_mask = np.zeros((batch_size, pad), np.int32)
            b_ids[: len(chunk)], b_mask[: len(chunk)] = ids[chunk, :pad], mask[chunk, :pad]
            b_mask[len(chunk):, 0] = 1  # padding rows attend to one token, so they stay finite
            states[chunk] = np.asarray(cls_states(encoder, jnp.asarray(b_ids), jnp.asarray(b_mask)))[: len(chunk)]
        log.info("cached the frozen text encoder's [CLS] states of %d captions in %.1f s", len(index),
                 time.time() - start)
        return cls(states, index)

    def lookup(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """input_ids, attention_mask [R, L] -> states [R, H] float32; a caption not in the cache is an error."""
        try:
            rows = [self.index[_key(i, m)] for i, m in zip(input_ids, attention_mask)]
        except KeyError:
            raise KeyError("a batch caption is not in the text-state cache (built from the training sources' "
                           "captions); was the data changed after the cache was built?") from None
        return self.states[rows]


def cached_text_states(host_batch: dict, cache: TextStateCache, captions: int) -> np.ndarray:
    """A host batch's (k-major [C*B, L]) captions -> their cached states, clips leading: [B, C, H]."""
    b = host_batch["audio"].shape[0]
    states = cache.lookup(host_batch["input_ids"][: captions * b], host_batch["attention_mask"][: captions * b])
    return np.ascontiguousarray(states.reshape(captions, b, -1).transpose(1, 0, 2))

