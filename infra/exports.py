"""Steering vectors in the formats serving engines read: llama.cpp GGUF, EasySteer JSON, safetensors.

One convention in every format, so a vector means the same thing in every engine: layer i is the
output of decoder block i (Hugging Face ``hidden_states[i + 1]``, except for the last block, whose
entry is after the final norm; llama.cpp ``direction.i``; EasySteer layer id i) and serving adds
``scale * v`` there. Tensors are float32 (little-endian)
and *unscaled*; the store's recommended scale is recorded beside them and is what each engine is
given: llama.cpp ``--control-vector-scaled FILE SCALE``, EasySteer's ``scale`` field, the
safetensors sidecar's ``scale``. Composition happens before export: BT vectors arrive composed
from θ and the basis, CAA vectors already shrunk toward the population.

gguf — a llama.cpp control vector as its ``cvector-generator`` and repeng's ``export_gguf`` write
it: ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (the model's
architecture, e.g. ``llama``), ``controlvector.layer_count`` (int32, the number of direction
tensors) and one float32 1-D tensor ``direction.<layer>`` per layer, plus ``steerstore.*`` keys
with the conventions. llama.cpp's loader (common.cpp ``common_control_vector_load_one``) rejects
the whole file if it holds ``direction.0`` and applies control vectors from layer 1 on, so layer 0
is left out with a note (a loud one when layer 0 is recommended). llama.cpp adds the vector at
every position, prompt included, whatever ``positions`` says.

easysteer — one JSON document per user for the vLLM-based EasySteer server (ZJU-REAL/EasySteer,
steering API v2)::

    {"steering": {                               # EasySteer SteeringSpec: send as the request's "steering"
       "vectors": [{                             # EasySteer VectorSpec
         "data": {                               # EasySteer Payload wire dict of a DirectionVector
           "version": 1, "kind": "direction", "extra": {},
           "tensors": {"layer.<i>": {"shape": [hidden], "data": "<base64 little-endian float32>"}},
           "sha256": "<EasySteer content digest, checked by the server>"},
         "algorithm": "direct", "scale": <recommended scale>, "layers": [<layers>], "normalize": false,
         "apply": {"prompt_positions": [-1], "generation": "all"},   # positions=response; all: prompt "all"
         "name": "steerstore/<user>/<method>"}]},
     "steerstore": {                             # ours; EasySteer's specs forbid unknown keys, so not sent
       "sha256": {"layer.<i>": "<sha256 of that vector's raw float32 bytes>"},
       "user_id", "method", "source", "scale", "layers", "positions", "hook", "operation", ...}}

Everything under ``steering`` is EasySteer's own schema (``vllm/model_hooks/steering/api.py``
``SteeringSpec``/``VectorSpec``, ``selection/spec.py`` for ``apply``, ``payloads.py`` for the wire
dict and its digest), so ``{"model": ..., "messages": ..., "steering": doc["steering"]}`` is a
complete OpenAI-compatible request body. ``steerstore`` is ours: per-vector sha256 of the raw
bytes and the conventions. EasySteer also reads a file on the server (``"source": "<path>.gguf"``
instead of ``data``; v1's ``SteerVectorRequest.steer_vector_local_path`` took only that): the
gguf export is that file, with the same ``direction.<i>`` numbering (minus layer 0).

safetensors — one float32 tensor ``layer.<i>`` of shape (hidden,) per layer in
``<stem>.safetensors``, and ``<stem>.json`` beside it with the conventions and the file's sha256.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np

from steerstore.infra.reader import UserVectors
from steerstore.infra.storage import StorageConfig, read_bytes, read_text

FORMATS = ("gguf", "easysteer", "safetensors")
LayerChoice = Literal["recommended", "all"]
FLOAT32_LE = np.dtype("<f4")
HOOK = "block_output"  # = Hugging Face hidden_states[i + 1]
OPERATION = "add"
EASYSTEER_WIRE_VERSION = 1  # EasySteer payloads.py _WIRE_VERSION
# model id fragment (lower case, without - _ .) -> architecture, first match wins; used when the
# model folder's config.json is not at hand
_ARCHITECTURES = (("qwen3", "qwen3"), ("qwen2", "qwen2"), ("gemma3", "gemma3"), ("gemma2", "gemma2"),
                  ("gemma", "gemma"), ("phi3", "phi3"), ("mistral", "mistral"), ("smollm", "llama"),
                  ("llama", "llama"))


class ExportError(ValueError):
    """Nothing of a vector set can be written in the asked format."""


class CorruptExport(ValueError):
    """An exported file does not match its recorded checksums or shapes."""


@dataclass
class ExportItem:
    """One vector set to export and where it came from."""

    vectors: UserVectors
    method: str  # a vector Method: caa | bt | population | style_vector
    source: str  # pairs | history | description | blend
    store_version: str
    model_hint: str  # the model's architecture, e.g. llama
    layers: LayerChoice = "recommended"


@dataclass
class Encoded:
    """An export as bytes: files by name suffix (the main file first), the layers written, notes."""

    files: dict[str, bytes]
    layers: list[int]
    scale: float
    notes: list[str] = field(default_factory=list)


@dataclass
class Loaded:
    """A read-back export: vectors by layer and the metadata stored with them."""

    vectors: dict[int, np.ndarray]
    meta: dict[str, Any]


def file_stem(user_id: str | None, method: str, source: str) -> str:
    """A file name stem safe on every filesystem: ``<user>.<method>``; odd ids get a hash."""
    if user_id is None:
        return "population"
    tag = f"{method}-{source}" if method == "style_vector" else method
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", user_id) and user_id != "population":
        return f"{user_id}.{tag}"
    # ids may hold slashes, "..", any Unicode: keep a readable prefix and tell ids apart by hash
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", user_id)[:40].lstrip(".")
    return f"{safe}-{hashlib.sha256(user_id.encode('utf-8')).hexdigest()[:12]}.{tag}"


def model_hint(manifest: dict) -> str:
    """The model's architecture (HF ``model_type``, as repeng writes it): from the model folder's
    config.json when it is on this machine, else from the model id; ``llama`` when unknown."""
    model = manifest.get("model", {})
    folder = model.get("name_or_path") or ""
    config = os.path.join(folder, "config.json")
    if folder and os.path.isfile(config):
        model_type = json.loads(read_text(config)).get("model_type")
        if model_type:
            return model_type
    key = re.sub(r"[-_.]", "", (model.get("id") or folder).lower())
    return next((arch for fragment, arch in _ARCHITECTURES if fragment in key), "llama")


def _chosen_layers(item: ExportItem) -> tuple[list[int], list[str]]:
    v = item.vectors
    if item.layers == "all" or not v.recommended_layers:
        notes = [] if item.layers == "all" else [f"no recommended layers stored; exporting all {v.layers}"]
        return sorted(v.layers), notes
    return sorted(v.recommended_layers), []


def _meta(item: ExportItem, layers: list[int]) -> dict[str, Any]:
    """The conventions every format records."""
    v = item.vectors
    return {
        "user_id": v.user_id, "scope": "population" if v.user_id is None else "user", "method": item.method,
        "source": item.source, "store_version": item.store_version, "model_id": v.model_id,
        "model_fingerprint": v.model_fingerprint, "model_hint": item.model_hint,
        "hidden_size": int(v.vectors.shape[1]), "hook": HOOK, "operation": OPERATION, "positions": v.positions,
        "scale": float(v.recommended_scale), "layers": layers, "recommended_layers": sorted(v.recommended_layers),
        "n_pairs": v.n_pairs, "scaled": False,
    }


def _raw(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=FLOAT32_LE).tobytes()


# ---- gguf (llama.cpp) ------------------------------------------------------------------------


def encode_gguf(item: ExportItem) -> Encoded:
    """A llama.cpp control vector; layer 0 is left out (llama.cpp cannot apply it)."""
    layers, notes = _chosen_layers(item)
    if 0 in layers:
        layers = [l for l in layers if l != 0]
        if 0 in item.vectors.recommended_layers:
            notes.append(f"WARNING: recommended layer 0 is left out: llama.cpp applies control vectors from layer 1 "
                         f"only, so this file steers layers {layers} alone and steers less than steerstore does")
        else:
            notes.append("layer 0 left out: llama.cpp applies control vectors from layer 1 (it rejects direction.0)")
    if not layers:
        raise ExportError("no layer llama.cpp can apply: the vectors are at layer 0 only")
    import gguf  # noqa: PLC0415  (only this format needs it)

    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # it logs every temporary file at INFO

    meta = _meta(item, layers)
    with tempfile.TemporaryDirectory() as tmp:  # GGUFWriter writes to a path
        path = os.path.join(tmp, "cvec.gguf")
        writer = gguf.GGUFWriter(path, "controlvector")  # sets general.architecture
        writer.add_string("controlvector.model_hint", item.model_hint)
        writer.add_int32("controlvector.layer_count", len(layers))
        for key, value in meta.items():
            if value is None:
                continue  # GGUF has no null: the population's user_id is simply absent
            if isinstance(value, bool):
                writer.add_bool(f"steerstore.{key}", value)
            elif isinstance(value, float):
                writer.add_float32(f"steerstore.{key}", value)
            elif isinstance(value, int):
                writer.add_int32(f"steerstore.{key}", value)
            elif isinstance(value, list):
                writer.add_array(f"steerstore.{key}", value)
            else:
                writer.add_string(f"steerstore.{key}", value)
        for layer, vector in item.vectors.at(layers).items():
            writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(vector, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(path, "rb") as fh:
            data = fh.read()
    return Encoded({".gguf": data}, layers, meta["scale"], notes)


def read_gguf(uri: str, storage: StorageConfig | None = None) -> Loaded:
    """A control vector file: ``direction.<i>`` tensors and every metadata key but GGUF's own."""
    import gguf  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:  # GGUFReader memory-maps a local path
        path = os.path.join(tmp, "cvec.gguf")
        with open(path, "wb") as fh:
            fh.write(read_bytes(uri, storage))
        reader = gguf.GGUFReader(path)
        meta = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
        vectors = {int(t.name.removeprefix("direction.")): np.array(t.data, dtype=np.float32)
                   for t in reader.tensors if t.name.startswith("direction.")}
    return Loaded(vectors, meta)


# ---- EasySteer ------------------------------------------------------------------------------


def easysteer_digest(wire: dict) -> str:
    """EasySteer's payload content hash (payloads.py ``_wire_digest``), which its server verifies:
    sha256 over ``kind:version``, then per tensor in name order its name, shape as a Python tuple
    and raw bytes, then ``key=repr(value)`` per extra key."""
    digest = hashlib.sha256(f"{wire['kind']}:{wire['version']}".encode())
    for name, entry in sorted(wire["tensors"].items()):
        digest.update(name.encode())
        digest.update(str(tuple(entry["shape"])).encode())
        digest.update(base64.b64decode(entry["data"], validate=True))
    for key, value in sorted(wire["extra"].items()):
        digest.update(f"{key}={value!r}".encode())
    return digest.hexdigest()


def encode_easysteer(item: ExportItem) -> Encoded:
    """The per-request EasySteer steering spec with the vectors inline (see the module docstring)."""
    layers, notes = _chosen_layers(item)
    raw = {f"layer.{l}": _raw(v) for l, v in item.vectors.at(layers).items()}
    hidden = int(item.vectors.vectors.shape[1])
    wire = {"version": EASYSTEER_WIRE_VERSION, "kind": "direction", "extra": {},
            "tensors": {name: {"shape": [hidden], "data": base64.b64encode(b).decode("ascii")}
                        for name, b in raw.items()}}
    wire["sha256"] = easysteer_digest(wire)
    meta = _meta(item, layers)
    # response = the last prompt token onwards (operators/runtime.py), which is this EasySteer clause
    apply = {"prompt_positions": [-1], "generation": "all"} if meta["positions"] == "response" \
        else {"prompt": "all", "generation": "all"}
    vector = {"data": wire, "algorithm": "direct", "scale": meta["scale"], "layers": layers, "normalize": False,
              "apply": apply, "name": f"steerstore/{meta['user_id'] or 'population'}/{item.method}"}
    doc = {"steering": {"vectors": [vector]},
           "steerstore": {**meta, "sha256": {name: hashlib.sha256(b).hexdigest() for name, b in raw.items()}}}
    return Encoded({".easysteer.json": json.dumps(doc, indent=1).encode("utf-8")}, layers, meta["scale"], notes)


def read_easysteer(uri: str, storage: StorageConfig | None = None) -> Loaded:
    """An EasySteer payload, checked: every vector against its sha256 and the payload's digest."""
    doc = json.loads(read_text(uri, storage))
    vector = doc["steering"]["vectors"][0]
    wire, ours = vector["data"], doc["steerstore"]
    if wire.get("kind") != "direction" or wire.get("version") != EASYSTEER_WIRE_VERSION:
        raise CorruptExport(f"{uri}: not an EasySteer direction payload (version {EASYSTEER_WIRE_VERSION})")
    vectors = {}
    for name, entry in wire["tensors"].items():
        try:
            raw = base64.b64decode(entry["data"], validate=True)
        except binascii.Error as exc:
            raise CorruptExport(f"{uri}: {name} is not valid base64 ({exc})") from None
        if len(raw) != FLOAT32_LE.itemsize * int(np.prod(entry["shape"])):
            raise CorruptExport(f"{uri}: {name} holds {len(raw)} bytes, not shape {entry['shape']} float32")
        if hashlib.sha256(raw).hexdigest() != ours["sha256"].get(name):
            raise CorruptExport(f"{uri}: {name} does not match its sha256")
        vectors[int(name.removeprefix("layer."))] = np.frombuffer(raw, dtype=FLOAT32_LE).astype(np.float32)
    if easysteer_digest(wire) != wire["sha256"]:
        raise CorruptExport(f"{uri}: the payload does not match its EasySteer sha256")
    return Loaded(vectors, {**ours, "steering": {k: v for k, v in vector.items() if k != "data"}})


# ---- safetensors ----------------------------------------------------------------------------


def encode_safetensors(item: ExportItem) -> Encoded:
    """``layer.<i>`` float32 tensors and a JSON sidecar with the conventions and the file's sha256."""
    from safetensors.numpy import save  # noqa: PLC0415

    layers, notes = _chosen_layers(item)
    data = save({f"layer.{l}": np.ascontiguousarray(v, dtype=FLOAT32_LE) for l, v in item.vectors.at(layers).items()})
    meta = {**_meta(item, layers), "tensors": "layer.<i>: float32 (hidden_size,)",
            "sha256": hashlib.sha256(data).hexdigest()}
    return Encoded({".safetensors": data, ".json": json.dumps(meta, indent=1).encode("utf-8")}, layers,
                   meta["scale"], notes)


def read_safetensors(uri: str, storage: StorageConfig | None = None) -> Loaded:
    """A ``.safetensors`` export and its sidecar (same stem, ``.json``), checked against its sha256."""
    from safetensors.numpy import load  # noqa: PLC0415

    data = read_bytes(uri, storage)
    meta = json.loads(read_text(uri.removesuffix(".safetensors") + ".json", storage))
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CorruptExport(f"{uri}: the file does not match the sha256 in its sidecar")
    return Loaded({int(name.removeprefix("layer.")): v for name, v in load(data).items()}, meta)


ENCODERS: dict[str, Callable[[ExportItem], Encoded]] = {
    "gguf": encode_gguf, "easysteer": encode_easysteer, "safetensors": encode_safetensors}
READERS: dict[str, Callable[..., Loaded]] = {
    "gguf": read_gguf, "easysteer": read_easysteer, "safetensors": read_safetensors}
