"""`CLSP`: the public inference API, mirroring the official README.

    model = CLSP.from_torch("clsp.safetensors", config, tokenizer="tokenizer.json")
    audio_emb, text_emb, scale = model(audio, audio_lens, ["A male speaker.", ...])
    similarity = audio_emb @ text_emb.T

Inputs are bucketed (waveform length, batch size, token length) so repeated calls with new lengths reuse a
handful of compiled programs instead of compiling one per shape.

Long audio: a clip longer than `max_seconds` (default `MAX_AUDIO_SECONDS`, 30 s: the authors trained on clips
of at most 30 s) is cut into the fewest consecutive, non-overlapping, equal-length windows of at most
`max_seconds` (`audio_windows`); its embedding is the mean of its windows' embeddings, L2-normalised again.
Equal lengths leave no short tail window to weigh as much as a full one, so no overlap is needed. Each
forward pass holds at most `batch_bucket(B)` waveforms of at most `max_seconds` (B: the rows of the call), so
device memory is bounded by the batch size and the window, whatever the clips' lengths; host memory holds
the caller's waveforms.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from clsp_jax import convert
from clsp_jax.features import SAMPLE_RATE, fbank
from clsp_jax.models.clsp import TORCH_MOUNTS, CLSPNet, model_config
from clsp_jax.tokenizer import CaptionTokenizer

# Padded waveform lengths in seconds; longer audio is padded to a multiple of the last.
AUDIO_BUCKETS_S = (1, 2, 4, 8, 16, 32)
# Shortest waveform the network accepts: 9 fbank frames give one output frame.
MIN_SAMPLES = 1280
# Longer clips are embedded as windows (module doc). The authors' training clips are at most this long.
MAX_AUDIO_SECONDS = 30.0


def audio_bucket(num_samples: int) -> int:
    for seconds in AUDIO_BUCKETS_S:
        if num_samples <= seconds * SAMPLE_RATE:
            return seconds * SAMPLE_RATE
    step = AUDIO_BUCKETS_S[-1] * SAMPLE_RATE
    return -(-num_samples // step) * step


def batch_bucket(n: int) -> int:
    """Next power of two >= n."""
    return 1 << max(0, (n - 1).bit_length())


def audio_windows(num_samples: int, max_samples: int) -> list[tuple[int, int]]:
    """[(start, stop)] sample ranges: the fewest consecutive, equal-length (to a sample) windows of at most
    `max_samples` that cover `num_samples`; one window [(0, num_samples)] when it fits."""
    count = max(1, -(-num_samples // max_samples))
    edges = [k * num_samples // count for k in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def max_audio_samples(max_seconds: float, name: str = "max_seconds") -> int:
    """`max_seconds` (finite, >= 1) as 16 kHz samples; raises ValueError naming `name` and the bad value."""
    if not 1 <= max_seconds < float("inf"):  # False for NaN too
        raise ValueError(f"{name} must be a number of seconds >= 1, got {max_seconds}")
    return int(max_seconds * SAMPLE_RATE)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([x, np.zeros((rows - len(x), *x.shape[1:]), x.dtype)]) if rows > len(x) else x


class CLSP:
    """A CLSP network with its config and tokenizer, for embedding audio and text.

    Attributes:
      net: the `CLSPNet` (an nnx.Module; use it directly for training).
      config: the normalised model config (`{"speech", "text", "joint_dim", ...}`).
      tokenizer: a `CaptionTokenizer`, or None (then only `embed_tokens` takes text).
    """

    def __init__(self, net: CLSPNet, config: Mapping, tokenizer: CaptionTokenizer | None = None):
        self.net = net
        self.config = model_config(config)
        self.tokenizer = tokenizer
        graphdef, state = nnx.split(net)
        self._state = state

        def call(method):
            return jax.jit(lambda st, *args: getattr(nnx.merge(graphdef, st), method)(*args))

        self._encode_features = call("encode_features")
        self._embed_features = call("embed_features")
        self._embed_tokens = call("embed_tokens")
        self._fbank = jax.jit(fbank)

    # -- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping, seed: int = 0, tokenizer=None) -> "CLSP":
        """Randomly initialised network."""
        return cls(CLSPNet(config, rngs=nnx.Rngs(seed)), config, _tokenizer(tokenizer))

    @classmethod
    def from_torch(cls, state_dict_or_path, config: Mapping, tokenizer=None) -> "CLSP":
        """The authors' PyTorch CLSP weights (icefall names, optionally under a leading `model.`).

        Args:
          state_dict_or_path: mapping name -> array, `.safetensors`, or torch checkpoint (weights_only).
          config: `{"speech": <icefall argument names>, "text": <HF config names>, "joint_dim"?,
            "logit_bias_init"?}`; with `logit_bias_init` set the checkpoint must hold a `logit_bias` tensor.
          tokenizer: a tokenizer.json path (or folder), a CaptionTokenizer, or None.
        """
        graphdef, shapes, rest = _abstract_net(config)
        net = _materialize(graphdef, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), rest)
        convert.load_clsp(net, state_dict_or_path)
        return cls(net, config, _tokenizer(tokenizer))

    @classmethod
    def from_params(cls, params: Mapping, config: Mapping, tokenizer=None) -> "CLSP":
        """A network holding `params`, the nested dict of `nnx.to_pure_dict(nnx.state(net, nnx.Param))`
        (e.g. a train state's `params` or `ema`, as `clsp_jax.train.checkpoint.restore_params` returns them).

        Raises ValueError naming missing, unexpected or mis-shaped parameters.
        """
        graphdef, shapes, rest = _abstract_net(config)
        want, got = nnx.traversals.flatten_mapping(shapes), nnx.traversals.flatten_mapping(params)
        problems = [f"missing {'/'.join(map(str, k))}" for k in want if k not in got]
        problems += [f"unexpected {'/'.join(map(str, k))}" for k in got if k not in want]
        problems += [f"{'/'.join(map(str, k))}: shape {np.shape(v)} vs model {want[k].shape}"
                     for k, v in got.items() if k in want and np.shape(v) != want[k].shape]
        if problems:
            raise ValueError(f"params do not fit the config's network ({len(problems)} problem(s)): "
                             + "; ".join(problems[:10]))
        params = jax.tree.map(lambda v, s: jnp.asarray(v, s.dtype), params, shapes)
        return cls(_materialize(graphdef, params, rest), config, _tokenizer(tokenizer))

    def torch_state_dict(self) -> dict[str, np.ndarray]:
        """The weights under the authors' PyTorch names and layouts (float32 numpy); a network with a logit
        bias adds the scalar `logit_bias` beside `logit_scale` (the authors' network has none)."""
        return convert.torch_state_dict(self.net, mounts=TORCH_MOUNTS)

    # -- embedding ----------------------------------------------------------------------------------------

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale)."""
        return float(np.asarray(self.net.scale()))

    @property
    def logit_bias(self) -> float | None:
        """The learnable logit bias of a siglip-trained network, added to scale * similarity; else None."""
        bias = self.net.bias()
        return None if bias is None else float(np.asarray(bias))

    def encode_features(self, features, feature_lens):
        """features [B, T, F] fbank, feature_lens [B] -> (frames [B, T', C], frame_lens [B])."""
        return self._encode_features(self._state, jnp.asarray(features), jnp.asarray(feature_lens))

    def embed_features(self, features, feature_lens):
        """features [B, T, F] fbank, feature_lens [B] -> unit-norm audio embeddings [B, D]."""
        return self._embed_features(self._state, jnp.asarray(features), jnp.asarray(feature_lens))

    def embed_tokens(self, input_ids, attention_mask):
        """input_ids, attention_mask [B, L] -> unit-norm text embeddings [B, D]."""
        return self._embed_tokens(self._state, jnp.asarray(input_ids), jnp.asarray(attention_mask))

    def embed_audio(self, audio, audio_lens=None, *, max_seconds: float = MAX_AUDIO_SECONDS) -> np.ndarray:
        """Raw 16 kHz waveforms -> [B, D] float32 numpy unit vectors.

        Args:
          audio: [B, N] padded float waveforms (or a list of 1-D arrays), 16 kHz mono, in [-1, 1].
          audio_lens: [B] valid sample counts (default: all N, or each array's length).
          max_seconds: clips longer than this are embedded as the normalised mean of their windows'
            embeddings (module doc); each forward pass holds at most batch_bucket(B) windows.
        """
        audio, audio_lens = _as_padded(audio, audio_lens)
        if np.any(audio_lens < MIN_SAMPLES):
            short = np.flatnonzero(audio_lens < MIN_SAMPLES).tolist()
            raise ValueError(f"audio rows {short} are shorter than {MIN_SAMPLES} samples (80 ms at 16 kHz)")
        max_samples = max_audio_samples(max_seconds)
        pieces = [(row, start, stop) for row, n in enumerate(audio_lens.tolist())
                  for start, stop in audio_windows(n, max_samples)]
        per_pass = batch_bucket(len(audio))
        total = np.zeros((len(audio), self.config["joint_dim"]), np.float32)
        for first in range(0, len(pieces), per_pass):
            chunk = pieces[first:first + per_pass]
            rows = np.array([row for row, _, _ in chunk])
            emb = self._embed_waveforms([audio[row, start:stop] for row, start, stop in chunk], per_pass)
            np.add.at(total, rows, emb)
        # A windowed row holds the sum of its windows' unit vectors: normalised, that is their normalised mean.
        windowed = np.bincount([row for row, _, _ in pieces], minlength=len(audio)) > 1
        total[windowed] /= np.linalg.norm(total[windowed], axis=-1, keepdims=True)
        return total

    def _embed_waveforms(self, waves: list[np.ndarray], rows: int) -> np.ndarray:
        """waves: 1-D float32 arrays of MIN_SAMPLES or more -> [len(waves), D], in one forward pass padded to
        `rows` rows (filler rows are valid but discarded) of their longest wave's `audio_bucket`."""
        lens = np.full(rows, MIN_SAMPLES, np.int32)
        lens[: len(waves)] = [len(w) for w in waves]
        padded = np.zeros((rows, audio_bucket(int(lens.max()))), np.float32)
        for row, wave in enumerate(waves):
            padded[row, : len(wave)] = wave
        feats, feat_lens = self._fbank(jnp.asarray(padded), jnp.asarray(lens))
        return np.asarray(self.embed_features(feats, feat_lens))[: len(waves)]

    def embed_text(self, text: Sequence[str]) -> np.ndarray:
        """Captions -> [B, D] float32 numpy, tokenised with the model's tokenizer.

        Raises ValueError for an empty (or whitespace-only) caption: its embedding would be that of the bare
        special tokens, a vector that matches no description.
        """
        if self.tokenizer is None:
            raise ValueError("this CLSP has no tokenizer: pass tokenizer=<tokenizer.json> when building it")
        empty = [i for i, t in enumerate(text) if not t.strip()]
        if empty:
            raise ValueError(f"captions {empty} are empty")
        tokens = self.tokenizer(list(text))
        rows = batch_bucket(len(text))
        ids, mask = (_pad_rows(tokens[k], rows) for k in ("input_ids", "attention_mask"))
        mask[len(text):, 0] = 1  # filler rows attend to one token so softmax stays finite
        return np.asarray(self.embed_tokens(ids, mask))[: len(text)]

    def __call__(self, audio=None, audio_lens=None, text=None):
        """-> (audio_emb [B, D] or None, text_emb [B', D] or None, exp(logit_scale)), as the official README.

        Clips longer than MAX_AUDIO_SECONDS are embedded in windows (`embed_audio`); empty captions raise."""
        audio_emb = None if audio is None else self.embed_audio(audio, audio_lens)
        text_emb = None if text is None else self.embed_text(text)
        return audio_emb, text_emb, self.logit_scale

    # -- persistence --------------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Writes `params/` (Orbax), `config.json` and `tokenizer.json` (if any) into `directory`."""
        directory = os.path.abspath(os.fspath(directory))
        os.makedirs(directory, exist_ok=True)
        params = nnx.to_pure_dict(nnx.state(self.net, nnx.Param))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(directory, "params"), params, force=True)
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(self.config, f, indent=2)
        if self.tokenizer is not None:
            shutil.copyfile(self.tokenizer.path, os.path.join(directory, "tokenizer.json"))

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CLSP":
        """Inverse of `save`."""
        directory = os.path.abspath(os.fspath(directory))
        config_path = os.path.join(directory, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{directory} is not a saved CLSP (no config.json)")
        with open(config_path) as f:
            config = json.load(f)
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(os.path.join(directory, "params"), _abstract_net(config)[1])
        tok = os.path.join(directory, "tokenizer.json")
        return cls.from_params(params, config, CaptionTokenizer(tok) if os.path.isfile(tok) else None)


@functools.lru_cache(maxsize=4)
def _abstract_net_cached(config_json: str):
    abstract = nnx.eval_shape(lambda: CLSPNet(json.loads(config_json), rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), rest


def _abstract_net(config: Mapping):
    """(graphdef, param ShapeDtypeStructs as a nested dict, abstract non-param state) of the config's network.

    Cached: tracing the constructor takes seconds, and export / load / from_torch each need it.
    """
    return _abstract_net_cached(json.dumps(model_config(config), sort_keys=True))


def abstract_params(config: Mapping) -> dict:
    """The parameters' ShapeDtypeStructs of the config's network, nested as `nnx.to_pure_dict` nests them
    (cached, as `_abstract_net`)."""
    return _abstract_net(config)[1]


def _materialize(graphdef, params, abstract_rest) -> CLSPNet:
    """The network of `graphdef` with `params` (a nested dict of arrays) and fresh concrete non-param state
    (rng streams re-seeded)."""
    def concrete(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                return jax.random.key(0)
            return jnp.zeros(x.shape, x.dtype)
        return x

    return nnx.merge(graphdef, params, jax.tree.map(concrete, abstract_rest))


def _tokenizer(tokenizer):
    if tokenizer is None or isinstance(tokenizer, CaptionTokenizer):
        return tokenizer
    return CaptionTokenizer(tokenizer)


def _as_padded(audio, audio_lens):
    if isinstance(audio, (list, tuple)):
        waves = [np.asarray(a, np.float32).reshape(-1) for a in audio]
        lens = np.array([len(w) for w in waves], np.int32)
        out = np.zeros((len(waves), max(lens, default=0)), np.float32)
        for row, w in enumerate(waves):
            out[row, : len(w)] = w
        return out, lens if audio_lens is None else np.asarray(audio_lens, np.int32)
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 2:
        raise ValueError(f"audio must be [B, N] waveforms, got shape {audio.shape}")
    lens = np.full(len(audio), audio.shape[1], np.int32) if audio_lens is None else np.asarray(audio_lens, np.int32)
    if lens.shape != (len(audio),) or np.any(lens > audio.shape[1]) or np.any(lens < 0):
        raise ValueError(f"audio_lens must be [B] counts within 0..{audio.shape[1]}, got {lens}")
    if not np.all(np.isfinite(audio)):
        raise ValueError("audio contains NaN or inf samples")
    return audio, lens
