"""Which model serves a store: the folder or hub id whose weights the store was built with.

Launch: ``steerstore model --store URI`` (prints it; ``--check`` loads it and compares the weights
fingerprint). From Python: ``steerstore.operators.runtime.sources.model_for_store(reader.manifest)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from steerstore.infra.config import check, option
from steerstore.infra.reader import StoreReader
from steerstore.infra.storage import StorageConfig
from steerstore.operators.runtime.sources import model_for_store


@dataclass
class ModelCmdConfig:
    store: str = option("", help="store URI (local folder or s3://bucket/prefix)")
    version: str | None = option(None, help="store version; default LATEST")
    check: bool = option(False, help="load the model and compare its weights fingerprint with the store's")
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig, metadata={"help": "object storage"})

    def __post_init__(self) -> None:
        check(bool(self.store), "a store URI is required (--store)")


def main(config: ModelCmdConfig) -> dict:
    reader = StoreReader(config.store, config.storage, config.version)
    built = reader.manifest["model"]
    path = model_for_store(reader.manifest)
    print(path)
    print(f"  store version {reader.version} was built with {built.get('name_or_path')!r} (id {built.get('id')}, "
          f"weights fingerprint {built.get('fingerprint')})")
    out = {"model": path, "name_or_path": built.get("name_or_path"), "id": built.get("id"),
           "fingerprint": built.get("fingerprint"), "version": reader.version}
    if config.check:
        from steerstore.operators.runtime import ModelConfig, ModelRuntime

        runtime = ModelRuntime(ModelConfig(name_or_path=path))
        reader.check_model(runtime.fingerprint, f"model {path!r}")  # FingerprintMismatch names both
        print(f"  checked: {path} has the store's weights ({runtime.fingerprint})")
        out["checked"] = True
    return out
