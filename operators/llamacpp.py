"""llama.cpp as a serving engine, driven through PyPI's ``llama-cpp-python`` binding.

Used to prove the exports in the engine itself (``steerstore verify-export``): the model's GGUF file
loaded by llama.cpp, a control-vector file read by ggml's own GGUF reader and laid out as llama.cpp's
loader does (``common_control_vector_load_one``: tensors ``direction.<i>``, i ≥ 1, float32 and 1-D,
scaled by the strength and summed into a buffer whose first row is layer 1), applied with the
binding's control-vector call (``llama_set_adapter_cvec``, layers 1..n_layer as
``--control-vector-scaled`` does without ``--control-vector-layer-range``). llama.cpp then adds
layer i's row to the output of decoder block i at every position, prompt included.

``llama-cpp-python`` is built from source by pip (``make setup`` does it once and caches the
wheel); without it this module raises a clear error.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Sequence

import numpy as np

GGML_TYPE_F32 = 0


def _binding():
    try:
        import llama_cpp  # noqa: PLC0415  (optional: compiled from source)
    except ImportError as exc:
        raise RuntimeError(
            "llama.cpp is not installed: `make setup` builds PyPI's llama-cpp-python from source and caches the "
            "wheel (needs cmake and a C++ compiler), or run `pip install llama-cpp-python`") from exc
    return llama_cpp


class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


def _ggml_base():
    """ggml's base library (the GGUF reader llama.cpp itself uses), with the calls we make typed."""
    llama_cpp = _binding()
    # the folder the binding loaded its libraries from (it honours LLAMA_CPP_LIB_PATH), and the soname
    # libllama links against, so the ggml-base already in the process is the one used
    folder = Path(getattr(llama_cpp.llama_cpp, "_base_path", Path(llama_cpp.__file__).parent / "lib"))
    names = [folder / n for n in ("libggml-base.so.0", "libggml-base.so", "libggml-base.dylib", "ggml-base.dll")]
    found = [n for n in names if n.exists()]
    if not found:
        raise RuntimeError(f"llama-cpp-python's library folder {folder} has no ggml-base library")
    lib = ctypes.CDLL(str(found[0]))
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GGUFInitParams]
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_name.restype = ctypes.c_char_p
    lib.gguf_get_tensor_type.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_type.restype = ctypes.c_int
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.ggml_get_tensor.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_get_tensor.restype = ctypes.c_void_p
    lib.ggml_n_dims.argtypes = [ctypes.c_void_p]
    lib.ggml_n_dims.restype = ctypes.c_int
    lib.ggml_nelements.argtypes = [ctypes.c_void_p]
    lib.ggml_nelements.restype = ctypes.c_int64
    lib.ggml_get_data_f32.argtypes = [ctypes.c_void_p]
    lib.ggml_get_data_f32.restype = ctypes.POINTER(ctypes.c_float)
    lib.ggml_free.argtypes = [ctypes.c_void_p]
    return lib


def load_control_vector(path: str | os.PathLike, strength: float = 1.0) -> tuple[int, np.ndarray, list[int]]:
    """A control-vector file as llama.cpp loads it: (n_embd, buffer of rows from layer 1, layers in the file).

    Read by ggml's GGUF reader; refused as llama.cpp refuses it (a tensor not named ``direction.<i>``
    with i ≥ 1, not float32, not 1-D, or of another width), with llama.cpp's reason.
    """
    lib = _ggml_base()
    ctx = ctypes.c_void_p()
    params = _GGUFInitParams(False, ctypes.pointer(ctx))
    gguf = lib.gguf_init_from_file(os.fsencode(path), params)
    if not gguf:
        raise ValueError(f"llama.cpp failed to load control vector file {path}")
    try:
        rows: dict[int, np.ndarray] = {}
        n_embd = -1
        for i in range(lib.gguf_get_n_tensors(gguf)):
            name = lib.gguf_get_tensor_name(gguf, i).decode()
            head, _, tail = name.partition(".")
            layer = int(tail) if head == "direction" and tail.isdigit() else -1
            if layer < 0:
                raise ValueError(f"invalid/unparsable direction tensor layer index {name!r} in {path}")
            if layer == 0:
                raise ValueError(f"invalid (zero) direction tensor layer index in {path}")
            tensor = lib.ggml_get_tensor(ctx, name.encode())
            if lib.gguf_get_tensor_type(gguf, i) != GGML_TYPE_F32:
                raise ValueError(f"invalid (non-F32) direction tensor type in {path}")
            if lib.ggml_n_dims(tensor) != 1:
                raise ValueError(f"invalid (non-1D) direction tensor shape in {path}")
            size = int(lib.ggml_nelements(tensor))
            if n_embd not in (-1, size):
                raise ValueError(f"direction tensor in {path} does not match previous dimensions")
            n_embd = size
            data = np.ctypeslib.as_array(lib.ggml_get_data_f32(tensor), shape=(size,)).astype(np.float32)
            rows[layer] = rows.get(layer, np.zeros(size, np.float32)) + data * np.float32(strength)
    finally:
        lib.gguf_free(gguf)
        if ctx:
            lib.ggml_free(ctx)
    if n_embd == -1:
        raise ValueError(f"no direction tensors found in {path}")
    buffer = np.zeros((max(rows), n_embd), np.float32)  # row 0 is layer 1
    for layer, row in rows.items():
        buffer[layer - 1] = row
    return n_embd, buffer, sorted(rows)


class LlamaCpp:
    """A GGUF model in llama.cpp: next-token logits and greedy decoding of token ids, with or without a
    control vector. One sequence at a time (llama.cpp applies one control vector per context)."""

    def __init__(self, model_path: str | os.PathLike, n_ctx: int = 1024, threads: int | None = None):
        """``n_ctx``: the longest sequence (prompt plus generated tokens) this engine will be given."""
        llama_cpp = _binding()
        self._llama_cpp = llama_cpp
        self.llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, logits_all=True, verbose=False,
                                   n_threads=threads or max(1, os.cpu_count() or 1), seed=0)
        self.n_embd = int(self.llm.n_embd())
        self.n_layer = int(llama_cpp.llama_model_n_layer(self.llm.model))

    def set_control_vector(self, path: str | os.PathLike, strength: float) -> list[int]:
        """Apply a control-vector file at ``strength`` (layers 1..n_layer); returns the file's layers."""
        n_embd, buffer, layers = load_control_vector(path, strength)
        if n_embd != self.n_embd:
            raise ValueError(f"control vector width {n_embd} does not match the model's n_embd {self.n_embd}")
        if max(layers) >= self.n_layer:
            raise ValueError(f"control vector holds layer {max(layers)}; the model has layers 0..{self.n_layer - 1}")
        # llama.cpp overwrites only the layers the buffer covers: pad to every layer so that no layer of a
        # previously applied vector stays
        full = np.zeros((self.n_layer - 1, n_embd), np.float32)
        full[:len(buffer)] = buffer
        flat = np.ascontiguousarray(full.reshape(-1))
        self.rows = full  # what was applied: row i - 1 is layer i, scaled
        rc = self._llama_cpp.llama_set_adapter_cvec(
            self.llm.ctx, flat.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), flat.size, n_embd, 1, self.n_layer)
        if rc != 0:
            raise RuntimeError(f"llama.cpp refused the control vector (llama_set_adapter_cvec returned {rc})")
        return layers

    def clear_control_vector(self) -> None:
        self._llama_cpp.llama_set_adapter_cvec(self.llm.ctx, None, 0, self.n_embd, -1, -1)

    def _check_length(self, n: int) -> None:
        if n > self.llm.n_ctx():
            raise ValueError(f"a sequence of {n} tokens is longer than llama.cpp's context of {self.llm.n_ctx()}")

    def next_logits(self, ids: Sequence[int]) -> np.ndarray:
        """(vocab,) float32 logits after the whole sequence ``ids`` (the cache is reset first)."""
        self._check_length(len(ids))
        self.llm.reset()
        self.llm.eval(list(ids))
        return np.array(self.llm.scores[self.llm.n_tokens - 1], dtype=np.float32)

    def choices(self, ids: Sequence[int], tokens: Sequence[int]) -> list[int]:
        """llama.cpp's argmax at each step of a given continuation ``tokens`` of ``ids`` (teacher forcing)."""
        self._check_length(len(ids) + len(tokens))
        self.llm.reset()
        self.llm.eval(list(ids))
        out: list[int] = []
        for token in tokens:
            out.append(int(np.argmax(self.llm.scores[self.llm.n_tokens - 1])))
            self.llm.eval([int(token)])
        return out

    def greedy(self, ids: Sequence[int], new_tokens: int, stop: Sequence[int] = ()) -> list[int]:
        """Greedy continuation of ``ids``: up to ``new_tokens`` token ids, ending at a ``stop`` id."""
        self._check_length(len(ids) + new_tokens)
        self.llm.reset()
        self.llm.eval(list(ids))
        out: list[int] = []
        for _ in range(new_tokens):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(token)
            if token in stop:
                break
            self.llm.eval([token])
        return out
