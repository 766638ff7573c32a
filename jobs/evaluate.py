"""The evaluation job: does each method personalise held-out text, and at what cost to fluency?

Launch: ``steerstore eval`` (the development data in ``../shared/data``, the default model) or
``steerstore eval --data.histories s3://bucket/histories.jsonl --out s3://bucket/eval-run``.

1. **Split.** Per user, the last ``data.heldout_items`` items by time are held out (a seeded
   split for users whose items lack timestamps, or when ``data.split`` is ``seeded``). A held-out
   item's ``input`` (e.g. the opening of a text) is the prompt and its ``output`` the target.
   An explicit held-out file (``data.heldout``, e.g. from ``steerstore import --format lamp``)
   replaces the split. Preference pairs are split per user the same way (seeded); without
   pairs, pairs are built from the histories: (input, the user's own output, another user's
   output for another input), training pairs from training items, held-out pairs from held-out
   items. Nothing the refresh job fits — per-user or population — sees a held-out target.
2. **Refresh** on the training split only, into ``<out>/store`` (a new store version).
3. **Generate**, greedy, on every held-out item: no personalisation, history in the prompt
   (top-k training items by BM25), SteerX style vectors (history / description / blend
   sources: the disentangling ablation), SteerX influence decoding, per-user CAA, BT and DPS,
   each at its recommended strength plus sweeps of γ / α / λ (and τ: each extra τ reruns the
   SteerX anchor and smoothing stages into a side store).
4. **Score**: ROUGE-1/L, METEOR, BLEU, BERTScore against the target; fluency as the perplexity
   of the output under the unsteered model (given the plain prompt); per-user deltas against
   no personalisation with bootstrap confidence intervals over users; per-user preference
   accuracy on held-out pairs.
5. **Write** ``report.html`` (self-contained), ``items.parquet``, ``summary.parquet``,
   ``per_user.parquet``, ``preference.parquet`` and ``summary.json`` to
   ``<store>/versions/<version>/eval/<run id>/`` and print the summary table.

A user a method has no artifact for (quarantined for it, or no DPS head with a positive score)
is not evaluated for that method: ``n_users`` per row says how many were, and the missing
users are listed in ``summary.json`` with the reason, never silently replaced by another
method's output.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import io
import json
import logging
import math
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from infra import storage
from infra.cluster import RayConfig
from infra.config import check, from_dict, option
from infra.reader import StoreReader, UserVectors
from infra.storage import StorageConfig
from jobs import refresh
from jobs.generate import steering_for
from jobs.pref_eval import PROMPT as DEV_PROMPT
from jobs.pref_eval import SOURCES as DEV_SOURCES
from jobs.pref_eval import _split as dev_split
from operators.bt import BTConfig
from operators.caa import CAAConfig
from operators.dps import DPSConfig
from operators.history import HistoryContextConfig, context_indices, history_prompt
from operators.metrics import METRICS as TEXT_METRICS
from operators.metrics import MetricsConfig, bootstrap_ci, ensure_wordnet, text_metrics
from operators.runtime import HeadContrast, Influence, ModelConfig, ModelRuntime
from operators.scale import ScaleConfig, baseline, margins, unsteered_prefers_chosen
from operators.steerx import SteerXConfig, word_effects
from schemas.inputs import validate_record

log = logging.getLogger("steerstore.eval")

METRICS = TEXT_METRICS + ("perplexity",)
LABELS = {
    "none": "no personalisation",
    "history_bm25": "history in prompt (BM25)",
    "steerx_vector_history": "SteerX style vector · history",
    "steerx_vector_description": "SteerX style vector · description",
    "steerx_vector_blend": "SteerX style vector · blend",
    "steerx_influence": "SteerX influence decoding",
    "caa": "CAA (per-user)",
    "bt": "BT ideal point",
    "dps": "DPS heads",
}
METHODS = tuple(LABELS)


@dataclass
class EvalDataConfig:
    histories: str = option("", help="user histories to split (JSONL/Parquet, local or s3://); empty: the dev data")
    heldout: str = option("", help="explicit held-out items (user_id, item_id, input, target), e.g. from "
                                   "`steerstore import --format lamp`; then histories are not split")
    preference_pairs: str = option("", help="preference pairs (split per user); empty: built from the histories")
    dev_dir: str = option("../shared/data", help="folder of the development data (used when histories is empty)")
    dev_sources: list[str] = option(["blogs", "synthpai"], help="development data sets")
    dev_users: int = option(8, help="development users per source (the first by id with enough items)")
    dev_words: int = option(60, help="development targets: the continuation cut to this many words")
    heldout_items: int = option(2, help="held-out items per user")
    split: Literal["time", "seeded"] = option(
        "time", help="time: each user's last items by timestamp (seeded for users without timestamps); seeded")
    min_history: int = option(4, help="training items a user needs to be evaluated")
    max_history: int = option(12, help="most recent training items per user given to the refresh job")
    heldout_pairs: int = option(2, help="held-out preference pairs per user (when pairs are given)")
    seed: int = option(0, help="seed of the split and of the other-user continuations in built pairs")

    def __post_init__(self) -> None:
        check(self.heldout_items >= 1 and self.min_history >= 2 and self.max_history >= self.min_history,
              "data: heldout_items >= 1, min_history >= 2 and max_history >= min_history")
        check(self.heldout_pairs >= 1, "data.heldout_pairs must be >= 1")
        check(set(self.dev_sources) <= set(DEV_SOURCES), f"data.dev_sources must be among {sorted(DEV_SOURCES)}")


@dataclass
class MethodsConfig:
    include: list[str] = option(list(METHODS), help=f"methods to evaluate, among {list(METHODS)}")
    max_new_tokens: int = option(64, help="tokens generated per held-out item (greedy)")
    history_k: int = option(2, help="history in prompt: training items shown (top-k by BM25 against the input)")
    history_chars: int = option(600, help="history in prompt: each shown item's output cut to this many characters")
    sweeps: bool = option(True, help="also evaluate the strength grids below (else recommended strengths only)")
    alpha_grid: list[float] = option([], help="CAA / BT α sweep; empty: the refresh's scale grid")
    gamma_grid: list[float] = option([], help="style-vector γ sweep; empty: steerx.vectors.gamma_grid")
    influence_lambda: float = option(1.0, help="influence decoding: the recommended λ")
    lambda_grid: list[float] = option([0.0, 0.5, 1.0, 2.0], help="influence λ sweep (0 = the description in the prompt)")
    influence_temperature: float = option(0.6, help="influence decoding: temperature inside the combination")
    dps_gamma_grid: list[float] = option([0.5, 1.0, 2.0, 4.0], help="DPS contrast γ sweep")
    tau_grid: list[float] = option(
        [], help="extra anchor thresholds τ: each reruns SteerX anchors + smoothing into a side store and is "
                 "evaluated by influence decoding at the recommended λ")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.include) - set(METHODS))
        check(not unknown, f"methods.include: unknown {unknown}; known: {list(METHODS)}")
        check(self.max_new_tokens >= 1 and self.history_k >= 1, "methods: max_new_tokens and history_k must be >= 1")


@dataclass
class EvalConfig:
    data: EvalDataConfig = dataclasses.field(default_factory=EvalDataConfig, metadata={"help": "held-out data"})
    methods: MethodsConfig = dataclasses.field(default_factory=MethodsConfig, metadata={"help": "what is compared"})
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig, metadata={"help": "metrics"})
    out: str = option("./steerstore-out/eval", help="folder (local or s3://) for the split inputs and the store")
    store: str = option("", help="evaluate this existing store instead of refreshing (its recorded training inputs "
                                 "must be exactly this split's: checked)")
    version: str | None = option(None, help="with --store: the version to evaluate (default LATEST)")
    examples: int = option(6, help="held-out items shown with every method's output in the report")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "the model"})
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig, metadata={"help": "object storage"})
    ray: RayConfig = dataclasses.field(default_factory=RayConfig, metadata={"help": "Ray connection"})
    validate: refresh.ValidateConfig = dataclasses.field(default_factory=lambda: refresh.ValidateConfig(max_tokens=768),
                                                         metadata={"help": "refresh: validation"})
    scale: ScaleConfig = dataclasses.field(default_factory=ScaleConfig, metadata={"help": "refresh: α choice"})
    caa: CAAConfig = dataclasses.field(default_factory=CAAConfig, metadata={"help": "refresh: CAA"})
    bt: BTConfig = dataclasses.field(default_factory=BTConfig, metadata={"help": "refresh: BT"})
    dps: DPSConfig = dataclasses.field(default_factory=DPSConfig, metadata={"help": "refresh: DPS"})
    steerx: SteerXConfig = dataclasses.field(default_factory=SteerXConfig, metadata={"help": "refresh: SteerX"})
    resources: refresh.ResourcesConfig = dataclasses.field(default_factory=refresh.ResourcesConfig,
                                                           metadata={"help": "refresh: scheduling"})

    def __post_init__(self) -> None:
        check(self.examples >= 0, "examples must be >= 0")


# ---- 1. data and split -----------------------------------------------------------------------

def _read_rows(uri: str, cfg: StorageConfig) -> list[dict]:
    """Rows of a JSONL(.gz) or Parquet file (a folder: all such files in it)."""
    formats = refresh._PARQUET_EXT + refresh._JSONL_EXT
    if not uri.lower().endswith(formats):
        files = [f for f in storage.list_files(uri, cfg) if f.lower().endswith(formats)]
        if not files:
            raise FileNotFoundError(f"no JSONL or Parquet files in {uri}")
        return [r for f in sorted(files) for r in _read_rows(f, cfg)]
    data = storage.read_bytes(uri, cfg)
    if uri.lower().endswith(refresh._PARQUET_EXT):
        return pq.read_table(io.BytesIO(data)).to_pylist()
    if uri.lower().endswith(".gz"):
        data = gzip.decompress(data)
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{uri} line {n}: invalid JSON ({exc.msg})") from None
    return rows


def dev_histories(data: EvalDataConfig) -> list[dict]:
    """History rows from the development data: input = the opening as a task, output = the continuation."""
    rows = []
    for source in data.dev_sources:
        path = Path(data.dev_dir) / DEV_SOURCES[source]
        if not path.exists():
            raise FileNotFoundError(
                f"development data {DEV_SOURCES[source]} not found in {Path(data.dev_dir).resolve()} (it lives in "
                "../shared/data beside the project checkout); pass --data.histories to evaluate your own data")
        with gzip.open(path, "rt") as fh:
            users = sorted((json.loads(line) for line in fh), key=lambda u: u["user_id"])
        taken = 0
        for user in users:
            items = []
            for item in user["items"]:
                split = dev_split(item["text"], data.dev_words)
                if split:
                    items.append({"user_id": user["user_id"], "item_id": item["id"],
                                  "input": DEV_PROMPT.format(opening=split[0]), "output": split[1],
                                  "timestamp": _dev_date(item.get("date"))})
            if len(items) >= data.min_history + data.heldout_items:
                rows.extend(items)
                taken += 1
            if taken == data.dev_users:
                break
    return rows


def _dev_date(value: str | None) -> str | None:
    """Blog dates like '12,December,2003' as ISO dates (None when absent or unparseable)."""
    if not value:
        return None
    try:
        return dt.datetime.strptime(value, "%d,%B,%Y").replace(tzinfo=dt.timezone.utc).isoformat()
    except ValueError:
        return None


@dataclass
class Split:
    train: dict[str, list[dict]]  # user -> training history items, oldest first
    heldout: list[dict]  # user_id, item_id, input, target
    train_pairs: list[dict]
    heldout_pairs: list[dict]
    notes: dict  # how each part was made, counts of skipped rows by reason


def _clean_histories(rows: list[dict], skipped: Counter) -> dict[str, list[dict]]:
    by_user: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        clean, reason = validate_record("histories", row)
        if clean is None:
            skipped[f"history row: {reason}"] += 1
            continue
        by_user[clean["user_id"]].append(clean)
    return by_user


def _order(items: list[dict], user: str, mode: str, seed: int) -> tuple[list[dict], str]:
    """Items oldest first when every item has a timestamp (and mode is time), else a seeded order."""
    if mode == "time" and all(i.get("timestamp") is not None for i in items):
        return sorted(items, key=lambda i: (i["timestamp"], i["item_id"])), "time"
    shuffled = sorted(items, key=lambda i: i["item_id"])
    random.Random(f"{seed}:{user}").shuffle(shuffled)
    return shuffled, "seeded"


def split_data(config: EvalDataConfig, cfg: StorageConfig) -> Split:
    skipped: Counter = Counter()
    rows = _read_rows(config.histories, cfg) if config.histories else dev_histories(config)
    by_user = _clean_histories(rows, skipped)
    train: dict[str, list[dict]] = {}
    heldout: list[dict] = []
    modes: dict[str, int] = defaultdict(int)
    too_few: list[str] = []
    if config.heldout:
        given: dict[str, list[dict]] = defaultdict(list)
        for row in _read_rows(config.heldout, cfg):
            if not all(isinstance(row.get(f), str) and row[f].strip() for f in ("user_id", "item_id", "input", "target")):
                skipped["held-out row without non-empty user_id, item_id, input and target"] += 1
                continue
            given[row["user_id"]].append({k: row[k] for k in ("user_id", "item_id", "input", "target")})
        for user in sorted(given):
            items, mode = _order(by_user.get(user, []), user, config.split, config.seed)
            if len(items) < config.min_history:
                too_few.append(user)
                continue
            modes[mode] += 1
            train[user] = items[-config.max_history:]
            heldout.extend(given[user])
    else:
        for user in sorted(by_user):
            items, mode = _order(by_user[user], user, config.split, config.seed)
            if len(items) < config.min_history + config.heldout_items:
                too_few.append(user)
                continue
            modes[mode] += 1
            train[user] = items[: -config.heldout_items][-config.max_history:]
            heldout.extend({"user_id": user, "item_id": i["item_id"], "input": i["input"], "target": i["output"]}
                           for i in items[-config.heldout_items:])
    if len(train) < 2:
        raise ValueError(f"only {len(train)} users have >= {config.min_history} training items and a held-out item; "
                         "the evaluation needs at least 2 (lower data.min_history or add data)")
    if config.preference_pairs:
        train_pairs, heldout_pairs = _split_pairs(_read_rows(config.preference_pairs, cfg), set(train), config, skipped)
        pairs_from = config.preference_pairs
    else:
        train_pairs, heldout_pairs = _built_pairs(train, heldout, config.seed)
        pairs_from = "built from the histories: (input, the user's output, another user's output)"
    notes = {"histories": config.histories or f"development data {config.dev_sources} in {config.dev_dir}",
             "heldout": config.heldout or f"last {config.heldout_items} items per user ({config.split} split)",
             "split_modes": dict(modes), "users_with_too_few_items": too_few, "skipped_rows": dict(skipped),
             "pairs": pairs_from}
    return Split(train, heldout, train_pairs, heldout_pairs, notes)


def _split_pairs(rows: list[dict], users: set[str], config: EvalDataConfig, skipped: Counter) -> tuple[list, list]:
    by_user: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        clean, reason = validate_record("preference_pairs", row)
        if clean is None:
            skipped[f"pair row: {reason}"] += 1
        elif clean["user_id"] in users:
            by_user[clean["user_id"]].append(clean)
    train, held = [], []
    for user in sorted(by_user):
        pairs = sorted(by_user[user], key=lambda p: p["pair_id"])
        random.Random(f"{config.seed}:pairs:{user}").shuffle(pairs)
        cut = len(pairs) - config.heldout_pairs if len(pairs) > config.heldout_pairs else len(pairs)  # else all train
        train.extend(pairs[:cut])
        held.extend(pairs[cut:])
    return train, held


def _built_pairs(train: dict[str, list[dict]], heldout: list[dict], seed: int) -> tuple[list, list]:
    """Training pairs from training items, held-out pairs from held-out items (rejected: another user's text)."""
    rng = random.Random(f"{seed}:built-pairs")
    users = sorted(train)
    train_pairs = []
    for user in users:
        others = [o for o in users if o != user]
        for item in train[user]:
            other = rng.choice(train[rng.choice(others)])
            train_pairs.append({"user_id": user, "pair_id": f"{item['item_id']}-pair", "prompt": item["input"],
                                "chosen": item["output"], "rejected": other["output"], "weight": 1.0})
    held_by_user = defaultdict(list)
    for h in heldout:
        held_by_user[h["user_id"]].append(h)
    heldout_pairs = []
    for h in heldout:
        others = [o for o in held_by_user if o != h["user_id"]]
        other = rng.choice(held_by_user[rng.choice(others)])
        heldout_pairs.append({"user_id": h["user_id"], "pair_id": f"{h['item_id']}-heldout-pair", "prompt": h["input"],
                              "chosen": h["target"], "rejected": other["target"], "weight": 1.0})
    return train_pairs, heldout_pairs


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, default=_json_default, ensure_ascii=False) + "\n" for r in rows)


def _json_default(value):
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---- 2. refresh ------------------------------------------------------------------------------

def _refresh_config(config: EvalConfig, inputs: dict[str, str], store: str, steerx: SteerXConfig | None = None,
                    side_store: bool = False) -> refresh.RefreshConfig:
    steerx = dataclasses.replace(steerx or config.steerx, token_effects=True)
    rc = refresh.RefreshConfig(
        inputs=refresh.InputsConfig(preference_pairs=inputs["pairs"], histories=inputs["histories"]),
        output=refresh.OutputConfig(store=store), storage=config.storage, ray=config.ray, model=config.model,
        validate=config.validate, caa=config.caa, bt=config.bt, scale=config.scale, dps=config.dps, steerx=steerx,
        resources=config.resources)
    if side_store:  # a τ-sweep store: SteerX anchors and descriptions only
        rc.bt = dataclasses.replace(config.bt, enabled=False)
        rc.dps = dataclasses.replace(config.dps, enabled=False)
        rc.scale = dataclasses.replace(config.scale, enabled=False)
        rc.steerx.vectors = dataclasses.replace(steerx.vectors, enabled=False)
    return rc


# ---- 3. generation ---------------------------------------------------------------------------

@dataclass
class Setting:
    method: str
    parameter: str  # alpha | gamma | lambda | tau | ""
    strength: float  # NaN without a parameter
    recommended: bool


def _grid(recommended: float, grid: list[float], sweeps: bool) -> list[tuple[float, bool]]:
    values = sorted({float(recommended), *(map(float, grid) if sweeps else [])})
    return [(v, math.isclose(v, recommended)) for v in values]


class Generator:
    """Greedy outputs of every method and strength for the held-out items, one batch per method."""

    def __init__(self, runtime: ModelRuntime, reader: StoreReader, split: Split, config: EvalConfig):
        self.runtime, self.reader, self.split, self.config = runtime, reader, split, config
        self.items = split.heldout
        self.users = sorted({h["user_id"] for h in self.items})
        self.rows: list[dict] = []
        self.missing: dict[str, dict[str, str]] = {}  # method -> user -> why

    def _emit(self, settings_rows: list[tuple[Setting, dict]], outputs: list[str], prompts: list[str]) -> None:
        for (s, item), out, prompt in zip(settings_rows, outputs, prompts):
            self.rows.append({"method": s.method, "label": LABELS[s.method], "parameter": s.parameter,
                              "strength": s.strength, "recommended": s.recommended, "user_id": item["user_id"],
                              "item_id": item["item_id"], "input": item["input"], "prompt": prompt,
                              "target": item["target"], "output": out})

    def _mark_missing(self, method: str, present: set[str], why: str) -> list[dict]:
        for u in self.users:
            if u not in present:
                self.missing.setdefault(method, {}).setdefault(u, why)
        return [h for h in self.items if h["user_id"] in present]

    def _timed(self, method: str, fn) -> None:
        start = time.perf_counter()
        before = len(self.rows)
        fn()
        log.info("eval: %s: %d outputs in %.1f s", method, len(self.rows) - before, time.perf_counter() - start)

    def run(self) -> None:
        m = self.config.methods
        steps = {"none": self.none, "history_bm25": self.history, "caa": lambda: self.vectors("caa"),
                 "bt": lambda: self.vectors("bt"), "steerx_influence": self.influence, "dps": self.dps}
        for source in ("history", "description", "blend"):
            steps[f"steerx_vector_{source}"] = lambda s=source: self.vectors(f"steerx_vector_{s}")
        for method in METHODS:
            if method in m.include:
                self._timed(method, steps[method])

    def none(self) -> None:
        prompts = [h["input"] for h in self.items]
        outs = self.runtime.generate(prompts, self.config.methods.max_new_tokens)
        self._emit([(Setting("none", "", math.nan, True), h) for h in self.items], outs, prompts)

    def history(self) -> None:
        m = self.config.methods
        ctx = HistoryContextConfig(context_items=m.history_k, selection="bm25", context_chars=m.history_chars)
        prompts = []
        for h in self.items:
            train = self.split.train[h["user_id"]]
            # the held-out item as the query after the training items: context_indices never picks it
            picked = context_indices([*train, {"input": h["input"]}], len(train), ctx)
            prompts.append(history_prompt([train[i] for i in picked], h["input"], ctx))
        outs = self.runtime.generate(prompts, m.max_new_tokens)
        self._emit([(Setting("history_bm25", "", math.nan, True), h) for h in self.items], outs, prompts)

    def _user_vectors(self, method: str) -> tuple[dict[str, UserVectors], str, list[float]]:
        if method in ("caa", "bt"):
            found = self.reader.vectors(self.users) if method == "caa" else self.reader.bt(self.users)
            grid = self.config.methods.alpha_grid or self.reader.manifest["config"]["scale"]["grid"]
            return found, "alpha", grid
        source = method.rsplit("_", 1)[1]
        found = self.reader.vectors(self.users, method="steerx", source=source)
        grid = self.config.methods.gamma_grid or \
            self.reader.manifest["config"]["steerx"]["vectors"]["gamma_grid"]
        return found, "gamma", grid

    def vectors(self, method: str) -> None:
        try:
            found, parameter, grid = self._user_vectors(method)
        except KeyError as exc:  # e.g. no BT basis in this store version
            self._mark_missing(method, set(), str(exc))
            return
        items = self._mark_missing(method, set(found), f"no {method} vectors in the store (quarantined for it)")
        if not items:
            return
        rows, users, alphas = [], [], []
        for h in items:
            u = found[h["user_id"]]
            for strength, rec in _grid(u.recommended_scale, grid, self.config.methods.sweeps):
                rows.append((Setting(method, parameter, strength, rec), h))
                users.append(u)
                alphas.append(strength)
        steer = steering_for(users, alphas)
        prompts = [h["input"] for _, h in rows]
        outs = self.runtime.generate(prompts, self.config.methods.max_new_tokens, steer=steer)
        self._emit(rows, outs, prompts)

    def influence(self, contexts: dict[str, dict] | None = None, tau: float | None = None) -> None:
        m = self.config.methods
        method = "steerx_influence"
        found = contexts if contexts is not None else self.reader.steerx(self.users)
        present = {u for u, r in found.items() if (r.get("context") or "").strip()}
        if tau is None:
            items = self._mark_missing(method, present, "no SteerX style description (quarantined for SteerX)")
            grid = _grid(m.influence_lambda, m.lambda_grid, m.sweeps)
            rows = [(Setting(method, "lambda", lam, rec), h) for h in items for lam, rec in grid]
        else:
            items = [h for h in self.items if h["user_id"] in present]
            rows = [(Setting(method, "tau", tau, False), h) for h in items]
        if not rows:
            return
        lam = [s.strength if s.parameter == "lambda" else m.influence_lambda for s, _ in rows]
        template = next(iter(found.values()))["style_template"]
        influence = Influence([found[h["user_id"]]["context"] for _, h in rows], lam=lam,
                              temperature=m.influence_temperature, template=template)
        prompts = [h["input"] for _, h in rows]
        outs = self.runtime.generate(prompts, m.max_new_tokens, influence=influence)
        self._emit(rows, outs, influence.with_context(prompts))

    def dps(self) -> None:
        found = {u: h for u, h in self.reader.dps(self.users).items() if h.heads}
        items = self._mark_missing("dps", set(found), "no DPS preference heads with a positive score")
        if not items:
            return
        grid = self.config.methods.dps_gamma_grid
        rows = [(Setting("dps", "gamma", g, rec), h) for h in items
                for g, rec in _grid(found[h["user_id"]].gamma, grid, self.config.methods.sweeps)]
        first = found[items[0]["user_id"]]
        contrast = HeadContrast([found[h["user_id"]].heads for _, h in rows], gamma=[s.strength for s, _ in rows],
                                adaptive=first.adaptive, plausibility=first.plausibility)
        prompts = [h["input"] for _, h in rows]
        outs = self.runtime.generate(prompts, self.config.methods.max_new_tokens, contrast=contrast)
        self._emit(rows, outs, prompts)


# ---- 4. scoring ------------------------------------------------------------------------------

def score_items(items: pd.DataFrame, runtime: ModelRuntime, metrics: MetricsConfig) -> pd.DataFrame:
    """Per item: the text metrics against the target and the output's NLL under the unsteered model."""
    pairs = list(dict.fromkeys(zip(items["output"], items["target"])))
    values = text_metrics([p for p, _ in pairs], [t for _, t in pairs], metrics, which=TEXT_METRICS)
    index = {pair: k for k, pair in enumerate(pairs)}
    rows = [index[p] for p in zip(items["output"], items["target"])]
    out = items.copy()
    for name in TEXT_METRICS:
        out[name] = np.asarray(values[name], dtype=np.float64)[rows]
    # fluency: log-likelihood of the output given the plain prompt (the held-out input), nothing steered
    # (each distinct input/output once: sweeps and the τ rows repeat outputs)
    texts = [t for t in dict.fromkeys(zip(items["input"], items["output"])) if t[1].strip()]
    scores: dict[tuple[str, str], tuple[float, int]] = {}
    if texts:
        lp, n = runtime.response_logprobs([x for x, _ in texts], [y for _, y in texts])
        scores = {t: (-s, c) for t, s, c in zip(texts, lp.tolist(), n.tolist())}
    nll_tokens = [scores.get(t, (0.0, 0)) for t in zip(items["input"], items["output"])]
    out["nll"] = np.asarray([v for v, _ in nll_tokens], dtype=np.float64)
    out["tokens"] = np.asarray([c for _, c in nll_tokens], dtype=np.int64)
    out["empty"] = ~out["output"].str.strip().astype(bool)
    return out


KEYS = ["method", "label", "parameter", "strength", "recommended"]  # one evaluated setting


def per_user_table(items: pd.DataFrame) -> pd.DataFrame:
    """One row per (setting, user): mean text metrics; perplexity = exp(Σ NLL / Σ tokens) over the user's items."""
    keys = KEYS + ["user_id"]
    g = items.fillna({"strength": -1.0}).groupby(keys, sort=False)
    users = g[list(TEXT_METRICS)].mean()
    sums = g[["nll", "tokens"]].sum()
    users["perplexity"] = np.where(sums["tokens"] > 0, np.exp(sums["nll"] / sums["tokens"].clip(lower=1)), np.nan)
    users["n_items"] = g.size()
    users["empty_outputs"] = g["empty"].sum()
    users = users.reset_index()
    users["strength"] = users["strength"].where(users["parameter"] != "", np.nan)
    return users


def summarise(users: pd.DataFrame, metrics: MetricsConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary per setting with Δ vs no personalisation and bootstrap CIs over users, per-user Δ rows)."""
    base = users[users["method"] == "none"].set_index("user_id")
    if base.empty:
        raise ValueError("the evaluation needs the 'none' method (the baseline of every delta)")
    summary: list[dict] = []
    per_user: dict[tuple, dict] = {}  # (setting, user) -> the user's Δ per metric, recommended settings only
    for key, grp in users.groupby(KEYS, sort=False, dropna=False):
        row = dict(zip(KEYS, key))
        row["n_users"] = int(grp["user_id"].nunique())
        row["n_items"] = int(grp["n_items"].sum())
        row["empty_outputs"] = int(grp["empty_outputs"].sum())
        for m in METRICS:
            vals = grp[m].to_numpy(dtype=float)
            row[m] = float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan
            deltas = vals - base.loc[grp["user_id"], m].to_numpy(dtype=float)
            finite = deltas[np.isfinite(deltas)]
            if row["method"] == "none" or not len(finite):
                row[f"delta_{m}"] = row[f"delta_{m}_lo"] = row[f"delta_{m}_hi"] = math.nan
            else:
                mean, lo, hi = bootstrap_ci(finite, metrics)
                row[f"delta_{m}"], row[f"delta_{m}_lo"], row[f"delta_{m}_hi"] = mean, lo, hi
            if row["recommended"] and row["method"] != "none":
                for uid, d in zip(grp["user_id"], deltas):
                    entry = per_user.setdefault((key, uid), {
                        "user_id": uid, **{k: row[k] for k in ("method", "label", "parameter", "strength")}})
                    entry[f"delta_{m}"] = float(d)
        summary.append(row)
    return pd.DataFrame(summary), pd.DataFrame(list(per_user.values()))


# ---- preference accuracy ---------------------------------------------------------------------

def preference_accuracy(runtime: ModelRuntime, reader: StoreReader, pairs: list[dict], metrics: MetricsConfig,
                        include: list[str]) -> pd.DataFrame:
    """Per-user accuracy on held-out pairs: steering raises log p(chosen) more than log p(rejected)."""
    if not pairs:
        return pd.DataFrame()
    users = sorted({p["user_id"] for p in pairs})
    base = baseline(runtime, pairs)
    reference = unsteered_prefers_chosen(runtime, pairs, base)
    rows = [_accuracy_row("none", "unsteered likelihood (reference)", math.nan, pairs, reference, metrics)]
    sources: dict[str, dict[str, UserVectors]] = {}
    if "caa" in include:
        sources["caa"] = reader.vectors(users)
    if "bt" in include:
        try:
            sources["bt"] = reader.bt(users)
        except KeyError:
            pass
    for source in ("history", "description", "blend"):
        if f"steerx_vector_{source}" in include:
            sources[f"steerx_vector_{source}"] = reader.vectors(users, method="steerx", source=source)
    for method, found in sources.items():
        evaluated = [p for p in pairs if p["user_id"] in found]
        if not evaluated:
            continue
        idx = [k for k, p in enumerate(pairs) if p["user_id"] in found]
        first = found[evaluated[0]["user_id"]]
        vectors = {l: np.stack([found[p["user_id"]].at([l])[l] * found[p["user_id"]].recommended_scale
                                for p in evaluated]) for l in first.recommended_layers}
        margin, _ = margins(runtime, evaluated, vectors, 1.0, base.select(idx), first.positions)
        rows.append(_accuracy_row(method, LABELS[method], first.recommended_scale, evaluated, margin > 0, metrics))
    return pd.DataFrame(rows)


def _accuracy_row(method: str, label: str, strength: float, pairs: list[dict], hits: np.ndarray,
                  metrics: MetricsConfig) -> dict:
    by_user: dict[str, list[bool]] = defaultdict(list)
    for p, h in zip(pairs, hits):
        by_user[p["user_id"]].append(bool(h))
    acc = np.asarray([np.mean(v) for v in by_user.values()])
    mean, lo, hi = bootstrap_ci(acc, metrics)
    return {"method": method, "label": label, "strength": strength, "pair_accuracy": float(np.mean(hits)),
            "user_accuracy": mean, "user_accuracy_lo": lo, "user_accuracy_hi": hi,
            "n_pairs": len(pairs), "n_users": len(by_user)}


# ---- token effects ---------------------------------------------------------------------------

def anchor_word_effects(reader: StoreReader, runtime: ModelRuntime, split: Split) -> np.ndarray:
    """The per-word leave-one-out effects the anchor threshold τ is applied to (Σ Δ of a word's tokens)."""
    table = reader.store.read_table("steerx_token_effects", reader.version)
    texts = {(u, i["item_id"]): i["output"] for u, items in split.train.items() for i in items}
    values = []
    for row in table.to_pylist():
        text = texts.get((row["user_id"], row["item_id"]))
        if text is None or row["delta"] is None:
            continue
        values.extend(e for _, e in word_effects(runtime.tokenizer, text, np.asarray(row["delta"])))
    return np.asarray(values, dtype=np.float64)


# ---- 5. the job ------------------------------------------------------------------------------

def main(config: EvalConfig) -> dict:
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 1)
        clock = now

    ensure_wordnet(config.metrics)  # fail before any work when METEOR cannot run
    split = split_data(config.data, config.storage)
    texts = {"histories": _jsonl([i for items in split.train.values() for i in items]),
             "pairs": _jsonl(split.train_pairs)}
    if config.store:  # evaluate a store version refreshed earlier, on exactly this training split
        reader = StoreReader(config.store, config.storage, config.version)
        inputs = _check_store_inputs(reader, texts, config.storage)
        store_uri, summary_refresh = config.store, reader.manifest.get("summary", {})
        steerx = from_dict(SteerXConfig, reader.manifest["config"]["steerx"])
    else:
        inputs = {"histories": storage.join(config.out, "inputs", "train_histories.jsonl"),
                  "pairs": storage.join(config.out, "inputs", "train_pairs.jsonl")}
        for kind, uri in inputs.items():
            storage.write_text(uri, texts[kind], config.storage)
        steerx = config.steerx
    storage.write_text(storage.join(config.out, "inputs", "heldout.jsonl"), _jsonl(split.heldout), config.storage)
    storage.write_text(storage.join(config.out, "inputs", "heldout_pairs.jsonl"), _jsonl(split.heldout_pairs),
                       config.storage)
    lap("split")
    if not config.store:
        store_uri = storage.join(config.out, "store")
        summary_refresh = refresh.main(_refresh_config(config, inputs, store_uri))
        reader = StoreReader(store_uri, config.storage, summary_refresh["version"])
    lap("refresh")
    runtime = ModelRuntime(config.model)
    reader.check_model(runtime.fingerprint, "the evaluation model")
    gen = Generator(runtime, reader, split, config)
    gen.run()
    lap("generate")
    tau_stores = _tau_sweep(config, inputs, gen, steerx)
    items = pd.DataFrame(gen.rows)
    lap("tau sweep")
    scored = score_items(items, runtime, config.metrics)
    users = per_user_table(scored)
    summary, per_user = summarise(users, config.metrics)
    lap("metrics")
    preference = preference_accuracy(runtime, reader, split.heldout_pairs, config.metrics, config.methods.include)
    lap("preference accuracy")
    effects = anchor_word_effects(reader, runtime, split) if any(
        m.startswith("steerx") for m in config.methods.include) else np.zeros(0)
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_uri = storage.join(reader.store.version_uri(reader.version), "eval", run_id)
    meta = {"title": "steerstore evaluation", "store": store_uri, "version": reader.version,
            "model": reader.manifest["model"].get("id"), "model_fingerprint": runtime.fingerprint, "run_id": run_id,
            "command": "steerstore eval " + " ".join(_flags(config)),
            "users": len(gen.users), "heldout_items": len(split.heldout), "train_items":
                sum(len(v) for v in split.train.values()),
            "train_pairs": len(split.train_pairs), "heldout_pairs": len(split.heldout_pairs),
            "decoding": f"greedy, {config.methods.max_new_tokens} new tokens",
            "data": split.notes, "missing": gen.missing, "tau": steerx.tau, "tau_stores": tau_stores,
            "refresh_stage_seconds": summary_refresh.get("stage_seconds"), "seconds": timings,
            "notes": _notes(summary, gen)}
    examples = _examples(scored, config.examples)
    from jobs.report import ReportData, render_report  # noqa: PLC0415  (matplotlib only when reporting)

    html = render_report(ReportData(meta=meta, summary=summary, per_user=per_user, token_effects=effects,
                                    tau=steerx.tau, preference=preference, examples=examples))
    lap("report")
    meta["seconds"] = timings
    _write(out_uri, config.storage, html, scored, summary, per_user, preference, meta)
    print_summary(summary, preference)
    print(f"\nreport: {storage.join(out_uri, 'report.html')}")
    return {"uri": out_uri, "summary": summary, "per_user": per_user, "preference": preference, "meta": meta,
            "items": scored}


def _check_store_inputs(reader: StoreReader, texts: dict[str, str], cfg: StorageConfig) -> dict[str, str]:
    """The store version's training inputs, refusing a version refreshed on anything but this split."""
    recorded = reader.manifest.get("inputs", {})
    uris = {"histories": recorded.get("histories"), "pairs": recorded.get("preference_pairs")}
    for kind, uri in uris.items():
        try:
            same = bool(uri) and storage.read_text(uri, cfg) == texts[kind]
        except FileNotFoundError:
            same = False
        if not same:
            raise ValueError(
                f"store version {reader.version} was refreshed on training {kind} {uri!r} that are not this "
                "evaluation's training split (missing, or different items): its artifacts may have seen held-out "
                "targets. Run eval without --store to refresh on the split, or use the same --data settings and "
                "--out as the run that built it")
    return uris


def _tau_sweep(config: EvalConfig, inputs: dict[str, str], gen: Generator, steerx: SteerXConfig) -> dict[str, str]:
    """Influence decoding with descriptions written from anchors at other τ (one side store per τ)."""
    if "steerx_influence" not in config.methods.include or not config.methods.sweeps:
        return {}
    stores = {}
    main_tau = steerx.tau
    main_rows = [r for r in gen.rows if r["method"] == "steerx_influence" and r["recommended"]]
    gen.rows.extend(dict(r, parameter="tau", strength=float(main_tau), recommended=False) for r in main_rows)
    for tau in sorted(set(config.methods.tau_grid) - {main_tau}):
        store = storage.join(config.out, "tau-sweep", f"tau-{tau:g}")
        summary = refresh.main(_refresh_config(config, inputs, store, dataclasses.replace(steerx, tau=float(tau)),
                                               side_store=True))
        reader = StoreReader(store, config.storage, summary["version"])
        gen.influence(contexts=reader.steerx(gen.users), tau=float(tau))
        stores[f"{tau:g}"] = f"{store} (version {summary['version']})"
    return stores


def _flags(config: EvalConfig) -> list[str]:
    """The non-default settings as CLI flags (for the report's reproduce line)."""
    flags = []

    def walk(obj, default, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value, base = getattr(obj, f.name), getattr(default, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, base, f"{prefix}{f.name}.")
            elif value != base:
                shown = ",".join(map(str, value)) if isinstance(value, list) else value
                flags.append(f"--{prefix}{f.name} {shown}")
    walk(config, EvalConfig(), "")
    return flags


def _notes(summary: pd.DataFrame, gen: Generator) -> list[str]:
    notes = []
    for method, users in gen.missing.items():
        notes.append(f"{LABELS[method]}: {len(users)} of {len(gen.users)} users not evaluated "
                     f"({next(iter(users.values()))})")
    empty = summary[summary["empty_outputs"] > 0]
    for _, r in empty.iterrows():
        notes.append(f"{r['label']} at {r['parameter'] or 'default'} {r['strength']:g}: {r['empty_outputs']} empty "
                     "outputs (scored as written; no perplexity)")
    return notes


def _examples(scored: pd.DataFrame, n: int) -> pd.DataFrame:
    """Every method's recommended output for the first held-out item of the first ``n`` users."""
    rec = scored[scored["recommended"]]
    first: dict[str, tuple] = {}
    for key in zip(rec["user_id"], rec["item_id"]):
        first.setdefault(key[0], key)
    keys = set(list(first.values())[:n])
    picked = rec[[k in keys for k in zip(rec["user_id"], rec["item_id"])]]
    return picked[["user_id", "item_id", "input", "target", "label", "output"]].reset_index(drop=True)


def _write(uri: str, cfg: StorageConfig, html: str, items: pd.DataFrame, summary: pd.DataFrame,
           per_user: pd.DataFrame, preference: pd.DataFrame, meta: dict) -> None:
    def parquet(df: pd.DataFrame) -> bytes:
        sink = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), sink)
        return sink.getvalue()

    storage.write_text(storage.join(uri, "report.html"), html, cfg)
    for name, df in (("items", items), ("summary", summary), ("per_user", per_user), ("preference", preference)):
        storage.write_bytes(storage.join(uri, f"{name}.parquet"), parquet(df), cfg)
    doc = {"meta": meta, "summary": summary.to_dict("records"), "preference": preference.to_dict("records")}
    storage.write_text(storage.join(uri, "summary.json"),
                       json.dumps(_finite(doc), indent=2, default=_json_default, ensure_ascii=False), cfg)


def _finite(value):
    """NaN / inf as null, so summary.json is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def print_summary(summary: pd.DataFrame, preference: pd.DataFrame) -> None:
    """The recommended setting of each method: metric means and Δ vs no personalisation [95% CI]."""
    rec = summary[summary["recommended"]]
    print(f"\n{'method':<36}{'strength':>9}{'users':>6}{'ROUGE-1':>9}{'ROUGE-L':>9}{'METEOR':>8}{'BLEU':>7}"
          f"{'BERTSc':>8}{'PPL':>8}   ΔROUGE-L [CI]           ΔMETEOR [CI]")
    for _, r in rec.iterrows():
        strength = "" if r["parameter"] == "" else f"{r['parameter'][:1]}={r['strength']:g}"
        line = (f"{r['label']:<36}{strength:>9}{r['n_users']:>6}{r['rouge1']:>9.4f}{r['rougeL']:>9.4f}"
                f"{r['meteor']:>8.4f}{r['bleu']:>7.2f}{r['bertscore']:>8.4f}{r['perplexity']:>8.2f}")
        if r["method"] != "none":
            line += (f"   {r['delta_rougeL']:+.4f} [{r['delta_rougeL_lo']:+.4f},{r['delta_rougeL_hi']:+.4f}]"
                     f"  {r['delta_meteor']:+.4f} [{r['delta_meteor_lo']:+.4f},{r['delta_meteor_hi']:+.4f}]")
        print(line)
    if not preference.empty:
        print(f"\n{'preference accuracy (held-out pairs)':<40}{'pairs':>7}{'users':>7}{'pair acc':>10}{'user acc [CI]':>24}")
        for _, r in preference.iterrows():
            print(f"{r['label']:<40}{r['n_pairs']:>7}{r['n_users']:>7}{r['pair_accuracy']:>10.3f}"
                  f"   {r['user_accuracy']:.3f} [{r['user_accuracy_lo']:.3f},{r['user_accuracy_hi']:.3f}]")

