"""Read users' steering artifacts from a published store version: point lookups for serving.

A bucketed version (``manifest.layout``, see schemas/store.py) answers a lookup by opening the
user's hash-bucket file once (its footer is kept) and reading the one row group whose user_id
statistics cover the id; rows are kept in an LRU cache per (table, user). Versions written
before the layout existed are read by filtering whole tables.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from steerstore.infra.artifacts import compose, serving_heads
from steerstore.infra.storage import StorageConfig, join, open_parquet, with_retries
from steerstore.infra.store import SteeringStore
from steerstore.schemas.methods import Family
from steerstore.schemas.store import (
    BUCKETED_TABLES,
    LAYOUT_KIND,
    POPULATION_FILE,
    STORE_TABLES,
    bucket_file,
    user_bucket,
)

MAX_USER_ID_BYTES = 4096


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
    # the prompt condition the heads were chosen in: this many of the user's history items shown before
    # each scored text (0: the bare text); serving should show the user's retrieved history the same way
    history_items: int = 0
    history_chars: int = 600


@dataclass
class UserArtifacts:
    """Everything a store version holds for one user, plus the population fallback.

    ``status`` found (some artifact is stored), unknown (nothing stored: the id is valid but not
    in this version, or the user was quarantined) or invalid (the id is malformed; nothing read).
    """

    user_id: object
    status: Literal["found", "unknown", "invalid"]
    reason: str | None = None
    caa: UserVectors | None = None
    bt: UserVectors | None = None
    style_vectors: dict[str, UserVectors] = field(default_factory=dict)  # SteerX, by source
    steerx: dict | None = None  # the steerx_users row: anchors, descriptions, context S, template
    dps: UserHeads | None = None
    population: UserVectors | None = None  # what vector methods fall back to
    recommended: dict[str, dict] = field(default_factory=dict)  # condition (plain | history) -> recommended row


class FingerprintMismatch(RuntimeError):
    """The store was built for other weights than the model loaded to serve it."""


def id_problem(user_id: object) -> str | None:
    """Why ``user_id`` cannot be a stored user id (None when it can)."""
    if not isinstance(user_id, str):
        return f"a user id must be a string, got {type(user_id).__name__}"
    if not user_id.strip():
        return "the user id is empty"
    try:
        size = len(user_id.encode("utf-8"))
    except UnicodeEncodeError:
        return "the user id is not valid Unicode text (lone surrogate)"
    if size > MAX_USER_ID_BYTES:
        return f"the user id is {size} bytes long; ids are at most {MAX_USER_ID_BYTES}"
    return None


def vectors_from_row(row: dict) -> UserVectors:
    """A ``vectors`` table row (``vectors`` as a (layers, hidden) array or nested lists) as ``UserVectors``."""
    return UserVectors(
        user_id=row["user_id"], layers=list(row["layers"]), vectors=np.asarray(row["vectors"], dtype=np.float32),
        recommended_layers=list(row["recommended_layers"] or []), recommended_scale=float(row["recommended_scale"]),
        positions=row["positions"], model_id=row["model_id"], model_fingerprint=row["model_fingerprint"],
        n_pairs=int(row["n_pairs"] or 0))


_from_row = vectors_from_row  # the former private name


def _read_groups(opened, groups: list[int]) -> pa.Table:
    with opened.lock:
        return opened.file.read_row_groups(groups)


def _rows_of(table: pa.Table) -> list[dict]:
    """Python rows; a ``vectors`` column (list of per-layer lists) becomes one (layers, hidden) array per row."""
    if "vectors" not in table.column_names or table.num_rows == 0:
        return table.to_pylist()
    rows = table.drop_columns(["vectors"]).to_pylist()
    column = table.column("vectors").combine_chunks()
    flat = column.flatten().flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    offsets = column.offsets.to_numpy()
    start = 0
    for i, row in enumerate(rows):
        n_layers = int(offsets[i + 1] - offsets[i])
        size = n_layers * int(row["hidden_size"])
        row["vectors"] = flat[start:start + size].reshape(n_layers, int(row["hidden_size"]))
        start += size
    return rows


class _BucketFile:
    """An open bucket file and its row groups' user_id ranges (sorted, disjoint but for ties)."""

    def __init__(self, parquet_file):
        self.file = parquet_file
        self.lock = threading.Lock()  # one reader of the file at a time
        meta = parquet_file.metadata
        column = parquet_file.schema_arrow.get_field_index("user_id")
        self.lows: list[str] | None = []
        self.highs: list[str] = []
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(column).statistics
            if stats is None or not stats.has_min_max:  # e.g. an id too long for statistics: scan the file
                self.lows = None
                break
            self.lows.append(stats.min)
            self.highs.append(stats.max)

    def groups(self, ids: Sequence[str]) -> list[int]:
        """Row groups that may hold any of ``ids``."""
        if self.lows is None:
            return list(range(self.file.metadata.num_row_groups))
        found = set()
        for uid in ids:
            g = bisect.bisect_left(self.highs, uid)  # first group whose max >= uid
            while g < len(self.highs) and self.lows[g] <= uid:
                found.add(g)
                g += 1
        return sorted(found)


class StoreReader:
    """Looks up users in one version of a store (the latest unless pinned).

    Lookups never raise for ids that are absent or malformed: those users are simply missing
    from the result (``artifacts`` says why). Storage errors are retried within the store's
    ``StorageConfig`` (``retries``, ``retry_budget_s``: give a serving process seconds, not minutes). Thread-safe; the LRU cache keeps the rows of about
    ``cache_users`` users (each table's rows of a user are one entry; 0 disables it), and the
    footers of the ``open_files`` most recently used bucket files (each about 100 bytes per row
    group and column, read again from storage when evicted).
    """

    def __init__(self, uri: str, storage: StorageConfig | None = None, version: str | None = None,
                 cache_users: int = 4096, open_files: int = 256):
        self.store = SteeringStore(uri, storage)
        self.version = self.store.resolve(version)
        self.manifest = self.store.read_manifest(self.version)
        self.layout = self.manifest.get("layout") or {}
        self.cache_users = cache_users
        self._basis: pa.Table | None = None
        self._bt: tuple | None = None
        self._dps_clusters: dict[int, dict] | None = None
        self._population: tuple[UserVectors | None] | None = None
        self.open_files = max(1, open_files)
        self._files: OrderedDict[str, _BucketFile] = OrderedDict()
        self._cache: OrderedDict[tuple[str, str], list[dict]] = OrderedDict()
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        if self.layout and self.layout.get("kind") != LAYOUT_KIND:
            raise ValueError(f"store version {self.version} has layout {self.layout.get('kind')!r}; this "
                             f"steerstore reads {LAYOUT_KIND!r} (upgrade steerstore)")

    # ---- the model ------------------------------------------------------------------------

    def check_model(self, fingerprint: str, name: str = "the serving model") -> None:
        """Refuse to serve this version with weights other than the ones it was built with."""
        expected = self.manifest.get("model", {}).get("fingerprint")
        if not expected:  # no silent pass: a version that cannot say its weights cannot be checked against any
            raise FingerprintMismatch(
                f"store version {self.version} of {self.store.uri} records no weights fingerprint "
                f"(manifest model: {self.manifest.get('model')}), so {name} cannot be checked against it; "
                "rebuild the store with `steerstore refresh`")
        if fingerprint != expected:
            built = self.manifest["model"]
            raise FingerprintMismatch(
                f"{name} has weights fingerprint {fingerprint}, but store version {self.version} of "
                f"{self.store.uri} was built with {built.get('name_or_path')!r} (id {built.get('id')}, weights "
                f"fingerprint {expected}). Serve it with that model (`steerstore model --store {self.store.uri}` "
                "prints where it is) or rebuild the store for this one")

    def _table(self, name: str) -> pa.Table:
        """A whole (small) table; empty when this version predates it."""
        if name not in self.manifest["tables"]:
            return STORE_TABLES[name].empty_table()
        return self.store.read_table(name, self.version)

    # ---- point lookups --------------------------------------------------------------------

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="steerstore-lookup")
            return self._executor

    def _bucketed(self, table: str) -> bool:
        return table in (self.layout.get("tables") or {})

    def _bucket_file(self, table: str, bucket: int) -> _BucketFile | None:
        name = bucket_file(bucket)
        if name not in self.manifest["tables"][table]["files"]:
            return None  # no user of this table hashes here
        uri = join(self.store.table_uri(self.version, table), name)
        with self._lock:
            opened = self._files.get(uri)
            if opened is not None:
                self._files.move_to_end(uri)
                return opened
        opened = _BucketFile(open_parquet(uri, self.store.storage))
        with self._lock:
            opened = self._files.setdefault(uri, opened)
            while len(self._files) > self.open_files:
                self._files.popitem(last=False)  # a lookup still holding it finishes; the file closes with it
        return opened

    def _lookup(self, table: str, ids: list[str]) -> dict[str, list[dict]]:
        """Rows of ``table`` per id, through the cache (ids without rows map to [])."""
        found: dict[str, list[dict]] = {}
        with self._lock:
            for uid in ids:
                hit = self._cache.get((table, uid))
                if hit is not None:
                    self._cache.move_to_end((table, uid))
                    found[uid] = hit
        misses = [u for u in ids if u not in found]
        if not misses:
            return found
        fetched: dict[str, list[dict]] = {u: [] for u in misses}
        if table not in self.manifest["tables"] or (self.layout and table in BUCKETED_TABLES
                                                    and not self._bucketed(table)):
            pass  # the table is older than this version's writer, or its method did not run: no rows
        elif self._bucketed(table):
            buckets: dict[int, list[str]] = {}
            for uid in misses:
                buckets.setdefault(user_bucket(uid, int(self.layout["buckets"])), []).append(uid)
            for bucket, wanted in buckets.items():
                opened = self._bucket_file(table, bucket)
                groups = opened.groups(wanted) if opened is not None else []
                if groups:
                    part = with_retries(lambda o=opened, g=groups: _read_groups(o, g), self.store.storage,
                                        f"look up {len(wanted)} user(s) in {table} bucket {bucket}")
                    part = part.filter(pc.is_in(part["user_id"], value_set=pa.array(wanted, pa.string())))
                    for row in _rows_of(part):
                        fetched[row["user_id"]].append(row)
        else:
            flt = pc.field("user_id").isin(misses)
            if table == "vectors":
                flt = flt & (pc.field("scope") == "user")
            for row in _rows_of(self.store.read_table(table, self.version, filter=flt)):
                fetched[row["user_id"]].append(row)
        with self._lock:
            for uid, rows in fetched.items():
                self._cache[(table, uid)] = rows
            while len(self._cache) > self.cache_users * len(BUCKETED_TABLES):
                self._cache.popitem(last=False)
        return {**found, **fetched}

    def _valid(self, user_ids: Sequence[object]) -> list[str]:
        return list(dict.fromkeys(u for u in user_ids if id_problem(u) is None))

    def default_source(self, family: str) -> str:
        """The source a family's vectors are served from: SteerX's configured one, else ``pairs``."""
        if family != Family.STEERX:
            return "pairs"
        return self.manifest.get("config", {}).get("steerx", {}).get("vectors", {}).get("source", "blend")

    def influence_lambda(self) -> float | None:
        """The influence-decoding λ the version recommends (chosen on validation items by the refresh), if any."""
        choice = ((self.manifest.get("scale_choice") or {}).get("steerx") or {}).get("recommended", {}).get("influence")
        return None if not choice else float(choice["lambda"])

    def composed_choice(self, method: str, source: str | None = None) -> tuple[list[int] | None, float | None]:
        """(layers, strength) the version recommends for ``method`` served on top of retrieved history (chosen by
        the refresh in that condition), or (None, None) when it chose none: caa | bt | population (α),
        style_vector with ``source`` (its layer and γ), influence (λ)."""
        choice = self.manifest.get("scale_choice") or {}
        if method in ("caa", "bt", "population"):
            alpha = ((choice.get("history") or {}).get(method) or {}).get("alpha")
            return None, None if alpha is None else float(alpha)
        steerx = (choice.get("steerx") or {}).get("recommended_history") or {}
        if method == "influence":
            lam = (steerx.get("influence") or {}).get("lambda")
            return None, None if lam is None else float(lam)
        picked = steerx.get(source or self.default_source(Family.STEERX))
        if not picked:
            return None, None
        return [int(picked["layer"])], float(picked["gamma"])

    def vectors(self, user_ids: Sequence[str], method: str = "caa", source: str | None = None) -> dict[str, UserVectors]:
        """Vectors of the given users that are in the store (absent or malformed ids are simply missing).

        ``method`` caa (source pairs) or steerx (source history | description | blend; default:
        the source the version recommends for serving).
        """
        source = source or self.default_source(method)
        found = {uid: self._pick(rows, method, source)
                 for uid, rows in self._lookup("vectors", self._valid(user_ids)).items()}
        return {uid: v for uid, v in found.items() if v is not None}

    def _pick(self, rows: list[dict], method: str, source: str) -> UserVectors | None:
        schema_v2 = int(self.manifest.get("store_schema_version", 1)) >= 2  # version 1 stores hold CAA only
        for row in rows:
            if row["method"] == method and (not schema_v2 or row["source"] == source):
                return vectors_from_row(row)
        return None

    def recommended(self, user_id: object) -> dict[str, dict]:
        """The user's recommended rows by condition (plain | history); {} when absent, malformed or the version
        predates the ``recommended`` table."""
        if id_problem(user_id) is not None:
            return {}
        return {r["condition"]: r for r in self._lookup("recommended", [user_id])[user_id]}

    def population_recommendation(self) -> dict[str, dict]:
        """The population's choice per condition ({method, source, multiplier, scale, ...}; users without a row
        get it); {} when the version records none."""
        return dict((self.manifest.get("recommend") or {}).get("population") or {})

    def steerx(self, user_ids: Sequence[str]) -> dict[str, dict]:
        """Users' SteerX rows: anchors, descriptions, the serving context S and the settings used."""
        return {u: rows[0] for u, rows in self._lookup("steerx_users", self._valid(user_ids)).items() if rows}

    def population(self) -> UserVectors | None:
        """The population vector row (read once)."""
        if self._population is None:
            if self._bucketed("vectors"):
                uri = join(self.store.table_uri(self.version, "vectors"), POPULATION_FILE)
                present = POPULATION_FILE in self.manifest["tables"]["vectors"]["files"]
                table = open_parquet(uri, self.store.storage).read() if present else None
            else:
                table = self.store.read_table("vectors", self.version, filter=pc.field("scope") == "population")
            rows = _rows_of(table) if table is not None else []
            self._population = (vectors_from_row(rows[0]) if rows else None,)
        return self._population[0]

    def bt_basis(self) -> pa.Table:
        """The version's preference basis, one row per layer (empty when BT was not fitted)."""
        if self._basis is None:
            self._basis = self._table("bt_basis").sort_by("layer")
        return self._basis

    def _bt_parts(self) -> tuple[list[int], np.ndarray, np.ndarray, dict]:
        """(layers, axes (layers, k, hidden), population norms, settings row) of the basis, built once."""
        if self._bt is None:
            basis = self.bt_basis()
            if basis.num_rows == 0:
                raise KeyError(f"store version {self.version} has no BT basis (bt.enabled was off or no users)")
            axes = np.stack([np.asarray(a, dtype=np.float32) for a in basis.column("axes").to_pylist()])
            self._bt = (basis.column("layer").to_pylist(), axes, basis.column("population_norm").to_numpy(),
                        basis.slice(0, 1).drop_columns(["axes"]).to_pylist()[0])
        return self._bt

    def bt_theta(self, user_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """Users' BT ideal points θ (k floats each); absent users are missing."""
        return {u: np.asarray(rows[0]["theta"], dtype=np.float32)
                for u, rows in self._lookup("bt_coords", self._valid(user_ids)).items() if rows}

    def bt(self, user_ids: Sequence[str]) -> dict[str, UserVectors]:
        """Users' BT directions composed from θ and the basis: B_lᵀθ rescaled to ‖p_l‖ per layer."""
        return {uid: self._compose(uid, theta) for uid, theta in self.bt_theta(user_ids).items()}

    def _compose(self, uid: str, theta: np.ndarray) -> UserVectors:
        layers, axes, norms, meta = self._bt_parts()
        return UserVectors(
            user_id=uid, layers=layers, vectors=compose(theta, axes, norms),
            recommended_layers=list(meta["recommended_layers"]), recommended_scale=float(meta["recommended_scale"]),
            positions=meta["positions"], model_id=meta["model_id"], model_fingerprint=meta["model_fingerprint"],
            n_pairs=0)

    def dps_clusters(self) -> dict[int, dict]:
        """The version's DPS clusters by id (empty without clusters)."""
        if self._dps_clusters is None:
            rows = self._table("dps_clusters").to_pylist()
            self._dps_clusters = {r["cluster"]: r for r in rows}
        return self._dps_clusters

    def dps(self, user_ids: Sequence[str], top_k: int | None = None) -> dict[str, UserHeads]:
        """Users' DPS heads: their own when scored individually, else their clusters' mixed by routing."""
        rows = [r[0] for r in self._lookup("dps_heads", self._valid(user_ids)).values() if r]
        return {r["user_id"]: self._heads(r, top_k) for r in rows}

    def _heads(self, r: dict, top_k: int | None = None) -> UserHeads:
        k = top_k or int(self.manifest.get("config", {}).get("dps", {}).get("top_k", 8))
        items, chars = self.dps_history()
        heads = serving_heads(r, self.dps_clusters() if not r["heads"] else {}, k)
        return UserHeads(
            user_id=r["user_id"], heads=heads, source=r["source"] if heads else "none",
            gamma=float(r["gamma"]), adaptive=bool(r["adaptive"]), plausibility=float(r["plausibility"]),
            cluster=r["cluster"], routing=list(r["routing"] or []), mode=r["mode"],
            pcs_baseline=r["pcs_baseline"], model_fingerprint=r["model_fingerprint"],
            history_items=items, history_chars=chars)

    def dps_history(self) -> tuple[int, int]:
        """(history items shown before each text when DPS heads were chosen, at most; characters kept of each
        context output). Scored as one conversation, each text came after every earlier scored item."""
        history = ((self.manifest.get("config") or {}).get("dps") or {}).get("history") or {}
        if history.get("arrangement") == "conversation":
            return max(0, int(history.get("max_items", 8)) - 1), int(history.get("context_chars", 600))
        return int(history.get("context_items", 0)), int(history.get("context_chars", 600))

    def users(self, user_ids: Sequence[str] | None = None) -> pa.Table:
        """The reconciliation rows (stored / quarantined and why) of some or all users."""
        if user_ids is None:
            return self.store.read_table("users", self.version)
        rows = [r for rows in self._lookup("users", self._valid(user_ids)).values() for r in rows]
        return pa.Table.from_pylist(rows, schema=STORE_TABLES["users"])

    def why_missing(self, user_id: object, what: str) -> str:
        """Why ``user_id`` has no ``what`` in this version: a malformed id, not in the inputs,
        quarantined (with the reason) or stored with other artifacts only."""
        problem = id_problem(user_id)
        if problem is not None:
            return problem
        rows = self.users([user_id]).to_pylist()
        why = "it was not in the inputs"
        if rows:
            why = f"its artifacts are {rows[0]['methods']}" if rows[0]["status"] == "stored" \
                else f"it is quarantined: {rows[0]['reason']}"
        return f"user {user_id!r} has no {what} in store version {self.version}: {why}"

    def artifacts(self, user_id: object) -> UserArtifacts:
        """Every artifact of one user (the serving lookup); never raises for a bad or unknown id."""
        problem = id_problem(user_id)
        if problem is not None:
            return UserArtifacts(user_id, "invalid", problem, population=self.population())
        has_bt = bool(self.manifest["tables"].get("bt_basis", {}).get("rows"))
        tables = ["vectors", "steerx_users", "dps_heads"] + (["bt_coords"] if has_bt else []) \
            + (["recommended"] if "recommended" in self.manifest["tables"] else [])
        # one read per table, concurrently: over S3 the lookup costs about one request's latency
        rows = dict(zip(tables, self._pool().map(lambda t: self._lookup(t, [user_id])[user_id], tables)))
        style = {r["source"]: vectors_from_row(r) for r in rows["vectors"] if r["method"] == "steerx"}
        art = UserArtifacts(
            user_id, "found", caa=self._pick(rows["vectors"], "caa", "pairs"),
            bt=self._compose(user_id, np.asarray(rows["bt_coords"][0]["theta"], dtype=np.float32))
            if rows.get("bt_coords") else None,
            style_vectors=style, steerx=rows["steerx_users"][0] if rows["steerx_users"] else None,
            dps=self._heads(rows["dps_heads"][0]) if rows["dps_heads"] else None, population=self.population(),
            recommended={r["condition"]: r for r in rows.get("recommended", [])})
        if art.caa is None and art.bt is None and not style and art.steerx is None and art.dps is None:
            art.status, art.reason = "unknown", f"no artifacts for this user in store version {self.version}"
        return art

