"""Read steering vectors of users from a published store version."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from infra.storage import SteeringStore, StorageConfig


@dataclass
class UserVectors:
    """One user's (or the population's) vectors with the conventions to apply them."""

    user_id: str | None
    layers: list[int]
    vectors: np.ndarray  # float32 (len(layers), hidden)
    recommended_layers: list[int]
    recommended_scale: float
    positions: str
    model_id: str
    model_fingerprint: str
    n_pairs: int

    def at(self, layers: Sequence[int]) -> dict[int, np.ndarray]:
        """The vectors of ``layers`` (each must be stored)."""
        missing = [l for l in layers if l not in self.layers]
        if missing:
            raise KeyError(f"layers {missing} are not stored; stored layers: {self.layers}")
        return {l: self.vectors[self.layers.index(l)] for l in layers}


@dataclass
class UserHeads:
    """A user's DPS preference heads, resolved for serving, with the decoding settings."""

    user_id: str
    heads: list[tuple[int, int]]  # (layer, query head), best first
    source: str  # user (their own) | cluster (mixed by routing) | none
    gamma: float
    adaptive: bool
    plausibility: float
    cluster: int | None
    routing: list[float]
    mode: str | None
    pcs_baseline: str | None
    model_fingerprint: str


def _from_row(row: dict) -> UserVectors:
    return UserVectors(
        user_id=row["user_id"], layers=list(row["layers"]), vectors=np.asarray(row["vectors"], dtype=np.float32),
        recommended_layers=list(row["recommended_layers"] or []), recommended_scale=float(row["recommended_scale"]),
        positions=row["positions"], model_id=row["model_id"], model_fingerprint=row["model_fingerprint"],
        n_pairs=int(row["n_pairs"] or 0))


class StoreReader:
    """Looks up users in one version of a store (the latest unless pinned)."""

    def __init__(self, uri: str, storage: StorageConfig | None = None, version: str | None = None):
        self.store = SteeringStore(uri, storage)
        self.version = self.store.resolve(version)
        self.manifest = self.store.read_manifest(self.version)
        self._basis: pa.Table | None = None
        self._dps_clusters: dict[int, dict] | None = None

    def vectors(self, user_ids: Sequence[str], method: str = "caa", source: str | None = None) -> dict[str, UserVectors]:
        """Vectors of the given users that are in the store (absent users are simply missing).

        ``method`` caa (source pairs) or steerx (source history | description | blend; default:
        the source the version recommends for serving).
        """
        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return {}
        if source is None:
            source = "pairs" if method == "caa" else \
                self.manifest.get("config", {}).get("steerx", {}).get("vectors", {}).get("source", "blend")
        flt = (pc.field("scope") == "user") & pc.field("user_id").isin(ids) & (pc.field("method") == method)
        if int(self.manifest.get("store_schema_version", 1)) >= 2:  # version 1 stores hold CAA only, no source
            flt = flt & (pc.field("source") == source)
        table = self.store.read_table("vectors", self.version, filter=flt)
        return {row["user_id"]: _from_row(row) for row in table.to_pylist()}

    def steerx(self, user_ids: Sequence[str]) -> dict[str, dict]:
        """Users' SteerX rows: anchors, descriptions, the serving context S and the settings used."""
        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return {}
        table = self.store.read_table("steerx_users", self.version, filter=pc.field("user_id").isin(ids))
        return {r["user_id"]: r for r in table.to_pylist()}

    def population(self) -> UserVectors | None:
        table = self.store.read_table("vectors", self.version, filter=pc.field("scope") == "population")
        return _from_row(table.to_pylist()[0]) if table.num_rows else None

    def bt_basis(self) -> pa.Table:
        """The version's preference basis, one row per layer (empty when BT was not fitted)."""
        if self._basis is None:
            self._basis = self.store.read_table("bt_basis", self.version).sort_by("layer")
        return self._basis

    def bt_theta(self, user_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Users' BT ideal points θ (k floats each); absent users are missing."""
        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return {}
        table = self.store.read_table("bt_coords", self.version, filter=pc.field("user_id").isin(ids))
        return {r["user_id"]: np.asarray(r["theta"], dtype=np.float32) for r in table.to_pylist()}

    def bt(self, user_ids: Sequence[str]) -> dict[str, UserVectors]:
        """Users' BT directions composed from θ and the basis: B_lᵀθ rescaled to ‖p_l‖ per layer."""
        from operators.bt import compose  # noqa: PLC0415

        basis = self.bt_basis()
        if basis.num_rows == 0:
            raise KeyError(f"store version {self.version} has no BT basis (bt.enabled was off or no users)")
        axes = np.stack([np.asarray(a, dtype=np.float32) for a in basis.column("axes").to_pylist()])
        norms = basis.column("population_norm").to_numpy()
        meta = basis.slice(0, 1).to_pylist()[0]
        out = {}
        for uid, theta in self.bt_theta(user_ids).items():
            out[uid] = UserVectors(
                user_id=uid, layers=basis.column("layer").to_pylist(), vectors=compose(theta, axes, norms),
                recommended_layers=list(meta["recommended_layers"]), recommended_scale=float(meta["recommended_scale"]),
                positions=meta["positions"], model_id=meta["model_id"], model_fingerprint=meta["model_fingerprint"],
                n_pairs=0)
        return out

    def dps_clusters(self) -> dict[int, dict]:
        """The version's DPS clusters by id (empty without clusters)."""
        if self._dps_clusters is None:
            rows = self.store.read_table("dps_clusters", self.version).to_pylist()
            self._dps_clusters = {r["cluster"]: r for r in rows}
        return self._dps_clusters

    def dps(self, user_ids: Sequence[str], top_k: int | None = None) -> dict[str, UserHeads]:
        """Users' DPS heads: their own when scored individually, else their clusters' mixed by routing."""
        from operators.dps import serving_heads  # noqa: PLC0415

        ids = list(dict.fromkeys(user_ids))
        if not ids:
            return {}
        k = top_k or int(self.manifest.get("config", {}).get("dps", {}).get("top_k", 8))
        table = self.store.read_table("dps_heads", self.version, filter=pc.field("user_id").isin(ids))
        out = {}
        for r in table.to_pylist():
            heads = serving_heads(r, self.dps_clusters() if not r["heads"] else {}, k)
            out[r["user_id"]] = UserHeads(
                user_id=r["user_id"], heads=heads, source=r["source"] if heads else "none",
                gamma=float(r["gamma"]), adaptive=bool(r["adaptive"]), plausibility=float(r["plausibility"]),
                cluster=r["cluster"], routing=list(r["routing"] or []), mode=r["mode"],
                pcs_baseline=r["pcs_baseline"], model_fingerprint=r["model_fingerprint"])
        return out

    def users(self, user_ids: Sequence[str] | None = None) -> pa.Table:
        """The reconciliation rows (stored / quarantined and why) of some or all users."""
        flt = pc.field("user_id").isin(list(user_ids)) if user_ids is not None else None
        return self.store.read_table("users", self.version, filter=flt)
