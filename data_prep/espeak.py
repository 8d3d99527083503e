"""ctypes binding to the espeak-ng library shipped by the PyPI package ``espeakng-loader``.

espeak-ng keeps its state in C globals, so there is one engine per process: call :func:`engine` to get it
(initialised on first use). Synthesis is synchronous: the library hands 16-bit PCM chunks at
``sample_rate`` (22050 Hz) to a callback that collects them. Each :meth:`Espeak.synthesize` call runs in a
forked child, so results never depend on what the process spoke before.
"""

import ctypes
import dataclasses
import functools
import os
import pickle
from collections.abc import Sequence

import espeakng_loader
import numpy as np

# espeak_AUDIO_OUTPUT: synchronous synthesis, samples delivered to the callback.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_EE_OK = 0

# espeak_PARAMETER ids and their valid ranges (espeak-ng speak_lib.h).
PARAMETERS = {
    "rate": (1, 80, 450),  # words per minute, default 175
    "volume": (2, 0, 200),  # amplitude percent, default 100
    "pitch": (3, 0, 100),  # base pitch, default 50
    "pitch_range": (4, 0, 100),  # pitch range (espeakRANGE: intonation swing), default 50
}


@dataclasses.dataclass(frozen=True)
class Utterance:
    """Text and the espeak settings to speak it with; ``voice`` is "<language>[+<variant>]", e.g.
    "en-us+f3", "en-gb-scotland+whisper"."""

    text: str
    voice: str
    rate: int = 175
    pitch: int = 50
    pitch_range: int = 50
    volume: int = 100


_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _Voice(ctypes.Structure):
    """espeak_VOICE."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),  # sequence of (priority byte, NUL-terminated name), ends with a 0 byte
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


class Espeak:
    """A synchronous espeak-ng engine. Create it through :func:`engine` (one per process)."""

    def __init__(self):
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = None
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (returned {rate})")
        self.sample_rate = rate
        self._lib = lib
        self._chunks: list[bytes] = []
        # Keep a reference: ctypes frees the trampoline if the Python object dies.
        self._callback = _SYNTH_CALLBACK(self._collect)
        lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav, num_samples, events):
        if num_samples > 0 and wav:
            self._chunks.append(ctypes.string_at(wav, num_samples * 2))
        return 0

    def list_voices(self) -> list[dict]:
        """Languages shipped with the data: [{"name", "identifier", "languages": [str]}], in library order."""
        voices = []
        table = self._lib.espeak_ListVoices(None)
        i = 0
        while table[i]:
            v = table[i].contents
            voices.append({
                "name": v.name.decode(),
                "identifier": v.identifier.decode(),
                "languages": _parse_languages(v.languages),
            })
            i += 1
        return voices

    def synthesize(self, utterances: Sequence[Utterance], seed: int = 0) -> list[np.ndarray]:
        """Speak each utterance in turn, as one take.

        Returns one float32 array in [-1, 1], shape [num_samples], per utterance, at ``self.sample_rate`` Hz.
        The output depends on the arguments only: espeak-ng's wave generator keeps state in static variables
        that espeak_Initialize does not reset (flutter phase, gain control, noise), so every call runs in a
        forked child of this process, which itself never synthesises; ``seed`` fixes the noise generator
        (breath, whisper).
        """
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: synthesise, send the result, exit without running the parent's cleanup
            exit_code = 1
            try:
                os.close(read_fd)
                try:
                    result = ("ok", self._speak(utterances, seed))
                except Exception as e:  # handed to the parent, which raises it
                    result = ("error", e)
                with os.fdopen(write_fd, "wb") as pipe:
                    pickle.dump(result, pipe)
                exit_code = 0
            finally:
                os._exit(exit_code)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            payload = pipe.read()
        _, status = os.waitpid(pid, 0)
        if not payload or os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"espeak child process failed (exit status {status})")
        kind, value = pickle.loads(payload)
        if kind == "error":
            raise value
        return [pcm.astype(np.float32) / 32768.0 for pcm in value]

    def _speak(self, utterances: Sequence[Utterance], seed: int) -> list[np.ndarray]:
        """Synthesise in this process; returns int16 arrays."""
        self._lib.espeak_ng_SetRandSeed(seed)
        out = []
        for u in utterances:
            if self._lib.espeak_SetVoiceByName(u.voice.encode()) != _EE_OK:
                raise ValueError(f"espeak-ng has no voice {u.voice!r}")
            for name, (pid, low, high) in PARAMETERS.items():
                value = getattr(u, name)
                if not low <= value <= high:
                    raise ValueError(f"espeak {name}={value} outside [{low}, {high}]")
                self._lib.espeak_SetParameter(pid, int(value), 0)
            data = u.text.encode("utf-8") + b"\0"
            self._chunks = []
            status = self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            if status != _EE_OK:
                raise RuntimeError(f"espeak_Synth failed with status {status} for {u.text!r}")
            out.append(np.frombuffer(b"".join(self._chunks), dtype=np.int16))
            self._chunks = []
        return out


def _parse_languages(address: int | None) -> list[str]:
    """Decode espeak_VOICE.languages: repeated (priority byte, name, NUL), ended by a zero priority byte."""
    names = []
    while address and ctypes.string_at(address, 1) != b"\0":
        name = ctypes.string_at(address + 1)  # reads up to the NUL
        names.append(name.decode())
        address += len(name) + 2
    return names


@functools.cache
def engine() -> Espeak:
    """The process's espeak-ng engine (espeak-ng is not re-entrant; never share one across threads)."""
    return Espeak()
