"""Export users' steering vectors for serving engines: llama.cpp GGUF, EasySteer JSON, safetensors.

Launch: ``steerstore export --store ./steerstore-out/store --user enthusiastic-0 --format gguf --out ./vectors``
(or ``--all`` for every stored user; ``--method caa|bt|population|style_vector``). One file per user (and a
sidecar for safetensors); formats and conventions are described in infra/exports.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from steerstore.infra.config import check, option
from steerstore.infra.exports import ENCODERS, ExportError, ExportItem, LayerChoice, file_stem, model_hint
from steerstore.infra.reader import StoreReader, UserVectors
from steerstore.infra.storage import StorageConfig, join, write_bytes
from steerstore.schemas.methods import FAMILY_OF, VECTOR_METHODS, Method

BATCH_USERS = 1000  # ids per vectors() call with --all
SHOWN_SKIPS = 20  # skipped users printed one by one; the summary lists them all


@dataclass
class ExportConfig:
    store: str = option("./steerstore-out/store", help="store URI (local folder or s3://bucket/prefix)")
    user: str = option("", help="the user to export (or --all)")
    all: bool = option(False, help="export every stored user")
    format: Literal["gguf", "easysteer", "safetensors"] = option(
        "gguf", help="gguf: llama.cpp control vector; easysteer: the EasySteer (vLLM) per-request steering JSON "
                     "with the vectors inline; safetensors: one tensor per layer plus a JSON sidecar")
    method: Method = option(
        Method.CAA, help="caa: the user's CAA direction; bt: their BT ideal point composed with the basis; population: "
                         "the one population vector (no --user / --all); style_vector: the user's SteerX style vector")
    source: str | None = option(None, help="style_vector: history | description | blend; default: the store's")
    layers: LayerChoice = option(
        "recommended", help="recommended: the store's recommended layers; all: every stored layer (llama.cpp's "
                            "--control-vector-layer-range A B can then select)")
    out: str = option("./steerstore-out/export", help="output folder (local or s3://bucket/prefix)")
    version: str | None = option(None, help="store version; default LATEST")
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig, metadata={"help": "object storage"})

    def __post_init__(self) -> None:
        check(self.method != "recommended", "--method recommended cannot be exported: it is chosen per user and per "
                                            "condition (and may be influence, dps or none); an export holds one "
                                            "vector method, so export the method the user's recommendation names")
        if self.method == "population":
            check(not self.user and not self.all, "--method population exports the one population vector: "
                                                  "drop --user / --all")
        else:
            check(bool(self.user) != self.all, "give exactly one of --user ID and --all")
        check(self.method in VECTOR_METHODS, f"--method must be a vector method: {', '.join(VECTOR_METHODS)}")
        check(self.source is None or self.method == "style_vector", "--source applies to --method style_vector only")
        check(self.source in (None, "history", "description", "blend"),
              f"--source must be history, description or blend, got {self.source!r}")


def describe(method: str, source: str) -> str:
    """What a vector method's export holds, in words (for "user X has no ...")."""
    return {"caa": "CAA vectors", "bt": "BT ideal point", "style_vector": f"SteerX {source} style vectors",
            "population": "population vector"}[method]


def found_vectors(reader: StoreReader, method: str, ids: list[str], source: str) -> dict[str, UserVectors]:
    """The ``method`` vectors of those of ``ids`` that have them (BT: composed from θ and the basis)."""
    if method == "bt":
        return reader.bt(ids)
    return reader.vectors(ids, method=FAMILY_OF[method], source=source)


def _batches(reader: StoreReader, config: ExportConfig):
    """Ids to export: the one --user, or every stored user BATCH_USERS at a time."""
    if not config.all:
        yield [config.user]
        return
    stored = [r["user_id"] for r in reader.users().to_pylist() if r["status"] == "stored"]
    for start in range(0, len(stored), BATCH_USERS):
        yield stored[start:start + BATCH_USERS]


def main(config: ExportConfig) -> dict:
    reader = StoreReader(config.store, config.storage, config.version)
    # BT and the population vector are fitted from pairs, as CAA is
    source = config.source or reader.default_source(FAMILY_OF[config.method])
    hint = model_hint(reader.manifest)
    what = describe(config.method, source)
    files: list[dict] = []
    skipped: dict[str, str] = {}
    noted: set[str] = set()

    def export(vectors: UserVectors) -> None:
        item = ExportItem(vectors, config.method, source, reader.version, hint, config.layers)
        try:
            encoded = ENCODERS[config.format](item)
        except ExportError as exc:
            skipped[vectors.user_id or "population"] = str(exc)
            return
        stem = file_stem(vectors.user_id, config.method, source)
        uris = [join(config.out, stem + suffix) for suffix in encoded.files]
        for uri, data in zip(uris, encoded.files.values()):
            write_bytes(uri, data, config.storage)
        files.append({"user_id": vectors.user_id, "files": uris, "layers": encoded.layers, "scale": encoded.scale,
                      "positions": vectors.positions, "notes": encoded.notes})
        line = f"{uris[0]} · {vectors.user_id or 'population'} · layers {encoded.layers} · scale {encoded.scale:g}"
        if config.format == "gguf":
            line += f" · llama.cpp: --control-vector-scaled {uris[0]} {encoded.scale:g}"
            recommended = [l for l in vectors.recommended_layers if l > 0]
            if config.layers == "all" and recommended:
                line += f" --control-vector-layer-range {min(recommended)} {max(recommended)}"
        print(line)
        for note in encoded.notes:
            if note not in noted:  # the same note for every user of an --all run is said once
                noted.add(note)
                print(f"  {note}")

    if config.method == "population":
        population = reader.population()
        if population is None:
            skipped["population"] = f"store version {reader.version} has no population vector (no user was stored)"
        else:
            export(population)
    else:
        for ids in _batches(reader, config):
            found = found_vectors(reader, config.method, ids, source)
            for uid in ids:
                if uid in found:
                    export(found[uid])
                else:
                    skipped[uid] = reader.why_missing(uid, what)
    for reason in list(skipped.values())[:SHOWN_SKIPS]:
        print(f"skipped: {reason}")
    if len(skipped) > SHOWN_SKIPS:
        print(f"skipped {len(skipped) - SHOWN_SKIPS} more users (the summary lists them all)")
    if config.format == "gguf" and any(f["positions"] == "response" for f in files):
        print("note: llama.cpp adds control vectors at every position, the prompt included; these vectors were "
              "fitted for response positions (the last prompt token onwards)")
    print(f"exported {len(files)} file set(s) to {config.out} ({config.format}, {config.method}, store version "
          f"{reader.version}); skipped {len(skipped)}")
    summary = {"store": config.store, "version": reader.version, "format": config.format, "method": config.method,
               "source": source, "out": config.out, "files": files, "skipped": skipped}
    if not files:  # the CLI exits non-zero: a script must not take "nothing written" for success
        summary["nothing_done"] = "nothing was exported" + (f": {next(iter(skipped.values()))}" if skipped else "")
    return summary
