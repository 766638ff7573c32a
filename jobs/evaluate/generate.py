"""Step 3 of the evaluation: plan every method's rows on the held-out items, at every strength."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from dataclasses import dataclass

import pyarrow.compute as pc

from steerstore.infra import storage
from steerstore.infra.reader import StoreReader, UserVectors
from steerstore.jobs import refresh
from steerstore.jobs.evaluate.config import (
    COMPOSED,
    COMPOSED_SUFFIX,
    LABELS,
    METHODS,
    RECOMMENDED,
    EvalConfig,
    _refresh_config,
)
from steerstore.jobs.evaluate.split import Split
from steerstore.operators.history import retrieved_prompt
from steerstore.operators.serving import (
    Request,
    plan_requests,
    recommended_lambda,
    recommended_setting,
    resolve_recommended,
)
from steerstore.operators.steerx import SteerXConfig
from steerstore.schemas.methods import Family

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
    """Plans every method's rows for the held-out items, at every strength; ``Workers`` decodes them.

    A planned row is the serving request that produces it (``serve``: the serving method, ``scale``,
    ``source``) and the prompt decoded (history in prompt and DPS: the BM25 history prompt). Only users
    with the method's own artifact get rows: the others are listed in ``missing`` with the reason,
    never served a fallback.
    """

    def __init__(self, reader: StoreReader, split: Split, config: EvalConfig):
        self.reader, self.split, self.config = reader, split, config
        self.items = split.heldout
        self.users = sorted({h["user_id"] for h in self.items})
        self.rows: list[dict] = []  # planned rows (run() fills it)
        self.missing: dict[str, dict[str, str]] = {}  # method -> user -> why
        self.descriptions: dict = {}  # SteerX: how many evaluated users got a valid style description, and why not
        # recommended settings: per setting, how many users' choice resolved to each method (and whose choice it was)
        self.recommendations: dict[str, Counter] = defaultdict(Counter)

    def _label(self, method: str) -> str:
        if method == "dps" and self.config.methods.dps_prompt == "history":
            base = self.baselines.get(method, "none")
            return f"{LABELS[method]} + history in prompt (Δ vs {LABELS[base]})"
        if method.endswith(COMPOSED_SUFFIX) and method in self.baselines:
            return f"{LABELS[method]} (Δ vs {LABELS[self.baselines[method]]})"
        return LABELS[method]

    def _plan(self, setting: Setting, item: dict, prompt: str, serve: str, scale: float | None = None,
              source: str | None = None, context: str | None = None, template: str | None = None,
              layers: list[int] | None = None) -> None:
        self.rows.append({"method": setting.method, "label": self._label(setting.method),
                          "parameter": setting.parameter, "strength": setting.strength,
                          "recommended": setting.recommended, "user_id": item["user_id"],
                          "item_id": item["item_id"], "input": item["input"], "prompt": prompt,
                          "target": item["target"], "serve": serve, "scale": scale, "source": source,
                          "context": context, "template": template, "layers": layers})

    def _mark_missing(self, method: str, present: set[str], why: str, reasons: dict[str, str] | None = None) -> list[dict]:
        for u in self.users:
            if u not in present:
                self.missing.setdefault(method, {}).setdefault(u, (reasons or {}).get(u, why))
        return [h for h in self.items if h["user_id"] in present]

    def _quarantined(self, stage: str) -> dict[str, str]:
        """Why the refresh quarantined each evaluated user for ``stage`` (from the store's quarantine table)."""
        table = self.reader.store.read_table("quarantine", self.reader.version,
                                             filter=(pc.field("stage") == stage) & (pc.field("input") == "user"))
        users = set(self.users)
        return {r["user_id"]: r["reason"] for r in table.select(["user_id", "reason"]).to_pylist()
                if r["user_id"] in users}

    def run(self) -> list[dict]:
        m = self.config.methods
        steps = {"none": self.none, "history_prompt": self.history, "caa": lambda: self.vectors("caa"),
                 "bt": lambda: self.vectors("bt"), "population": lambda: self.vectors("population"),
                 "influence": self.influence, "dps": self.dps}
        for source in ("history", "description", "blend"):
            steps[f"style_vector:{source}"] = lambda s=source: self.vectors(f"style_vector:{s}")
        for base in COMPOSED:
            composed = base + COMPOSED_SUFFIX
            steps[composed] = (lambda c=composed: self.influence(c)) if base == "influence" \
                else (lambda c=composed: self.vectors(c))
        for method in RECOMMENDED:
            steps[method] = lambda c=method: self.recommended(c)
        for method in METHODS:
            if method in m.include:
                steps[method]()
        return self.rows

    def none(self) -> None:
        for h in self.items:
            self._plan(Setting("none", "", math.nan, True), h, h["input"], "none")

    def _history_prompts(self, items: list[dict]) -> list[str]:
        """Each held-out input after the user's top-k training items by BM25 (the history-in-prompt baseline)."""
        ctx = self.config.methods.history_context
        return [retrieved_prompt(self.split.train[h["user_id"]], h["input"], ctx) for h in items]

    def history(self) -> None:
        for h, prompt in zip(self.items, self._history_prompts(self.items)):
            self._plan(Setting("history_prompt", "", math.nan, True), h, prompt, "none")

    def _user_vectors(self, method: str) -> tuple[dict[str, UserVectors], str, list[float]]:
        if method in ("caa", "bt", "population"):
            if method == "population":  # the same direction for every user: what per-user steering must beat
                population = self.reader.population()
                if population is None:
                    raise KeyError(f"store version {self.reader.version} has no population vector")
                found = {u: population for u in self.users}
            else:
                found = self.reader.vectors(self.users) if method == "caa" else self.reader.bt(self.users)
            grid = self.config.methods.alpha_grid or self.reader.manifest["config"]["scale"]["grid"]
            return found, "alpha", grid
        source = method.split(":", 1)[1]
        found = self.reader.vectors(self.users, method=Family.STEERX, source=source)
        grid = self.config.methods.gamma_grid or \
            self.reader.manifest["config"]["steerx"]["vectors"]["gamma_grid"]
        return found, "gamma", grid

    def vectors(self, method: str) -> None:
        base = method.removesuffix(COMPOSED_SUFFIX)
        composed = base != method  # on top of the history prompt, at the strength chosen in that condition
        try:
            found, parameter, grid = self._user_vectors(base)
        except KeyError as exc:  # e.g. no BT basis in this store version
            self._mark_missing(method, set(), str(exc))
            return
        serve, _, source = base.partition(":")
        items = self._mark_missing(method, set(found), f"no {base} vectors in the store (quarantined for it)")
        prompts = self._history_prompts(items) if composed else [h["input"] for h in items]
        for h, prompt in zip(items, prompts):
            layers, recommended = recommended_setting(self.reader, serve, source or None, found[h["user_id"]], composed)
            for strength, rec in _grid(recommended, grid, self.config.methods.sweeps):
                self._plan(Setting(method, parameter, strength, rec), h, prompt, serve, strength, source or None,
                           layers=layers)

    def recommended(self, method: str = "recommended") -> None:
        """Each user's recommended method and strength, resolved by serving's own ``plan_requests`` (the user's row
        for the condition, else the population's choice, else none) and planned as the request it resolves to: the
        same method, strength, layers and source (the population vector or nothing where serving falls back)."""
        composed = method != "recommended"
        if not self.reader.manifest.get("recommend"):
            self._mark_missing(method, set(), f"store version {self.reader.version} records no recommendations "
                                              "(refreshed before them, or with recommend.enabled off)")
            return
        prompts = self._history_prompts(self.items) if composed else [h["input"] for h in self.items]
        seen: set[str] = set()
        for h, prompt in zip(self.items, prompts):
            uid = h["user_id"]
            # the condition is the request's: with history (its items only decide that here; the prompt is planned)
            history = [{"input": t["input"], "output": t["output"]} for t in self.split.train.get(uid, [])
                       if (t.get("output") or "").strip()] if composed else None
            request = Request(uid, h["input"], "recommended", history=history or None)
            # resolved once, then planned as serving plans the request it resolves to (plan_requests would
            # resolve it again)
            explicit, _ = resolve_recommended(self.reader, request, self.reader.artifacts(uid))
            _, (record,) = plan_requests(self.reader, [explicit])
            serve = {"none": "none", "population": "population"}.get(record.applied, explicit.method)
            if uid not in seen:
                seen.add(uid)
                chosen = (explicit.method if explicit.method == "none" or record.applied == "user"
                          else f"{explicit.method} → {serve}")
                row = self.reader.recommended(uid).get("history" if history else "plain")
                self.recommendations[method][f"{chosen} ({row['chosen_by'] if row else 'population'})"] += 1
            self._plan(Setting(method, "", math.nan, True), h, prompt, serve, record.scale,
                       explicit.source if serve == "style_vector" else None, layers=record.layers)

    def influence_lambda(self, composed: bool = False) -> float:
        """The recommended λ: the option's, else the store's (chosen on validation items, in the composed
        condition for ``composed``), else serving's default."""
        if self.config.methods.influence_lambda is not None:
            return float(self.config.methods.influence_lambda)
        return recommended_lambda(self.reader, composed)

    def influence(self, method: str = "influence") -> None:
        m = self.config.methods
        composed = method != "influence"
        found = self.reader.steerx(self.users)
        present = {u for u, r in found.items() if (r.get("context") or "").strip()}
        items = self._mark_missing(method, present, "no SteerX style description (quarantined for SteerX)",
                                   self._quarantined("steerx"))
        if not composed:
            why = Counter(self.missing.get("influence", {}).values())
            self.descriptions = {"users": len(self.users), "with_description": len(present & set(self.users)),
                                 "without": dict(why.most_common())}
        prompts = self._history_prompts(items) if composed else [h["input"] for h in items]
        for h, prompt in zip(items, prompts):
            for lam, rec in _grid(self.influence_lambda(composed), m.lambda_grid, m.sweeps):
                self._plan(Setting(method, "lambda", lam, rec), h, prompt, "influence", lam)

    def influence_at_tau(self, contexts: dict[str, dict], tau: float) -> None:
        """Influence decoding at the recommended λ with descriptions from a side store refreshed at another τ."""
        lam = self.influence_lambda()
        for h in self.items:
            row = contexts.get(h["user_id"])
            if row and (row.get("context") or "").strip():
                self._plan(Setting("influence", "tau", tau, False), h, h["input"], "influence", lam,
                           context=row["context"], template=row["style_template"])

    def dps(self) -> None:
        found = {u: h for u, h in self.reader.dps(self.users).items() if h.heads}
        items = self._mark_missing("dps", set(found), "no DPS preference heads with a positive score")
        # as in the paper: the contrast applied on top of the retrieved-history prompt, and compared with it
        prompts = self._history_prompts(items) if self.config.methods.dps_prompt == "history" \
            else [h["input"] for h in items]
        for h, prompt in zip(items, prompts):
            for g, rec in _grid(found[h["user_id"]].gamma, self.config.methods.dps_gamma_grid,
                                self.config.methods.sweeps):
                self._plan(Setting("dps", "gamma", g, rec), h, prompt, "dps", g)

    @property
    def baselines(self) -> dict[str, str]:
        """method -> the method its Δ is taken against (else no personalisation)."""
        m = self.config.methods
        if "history_prompt" not in m.include:
            return {}
        composed = {c: "history_prompt" for c in m.include if c.endswith(COMPOSED_SUFFIX)}
        return {**composed, **({"dps": "history_prompt"} if m.dps_prompt == "history" else {})}


def tau_curve(config: EvalConfig) -> bool:
    """Whether the eval draws influence decoding's τ curve (influence evaluated, sweeps on)."""
    return "influence" in config.methods.include and config.methods.sweeps


def tau_sweep(config: EvalConfig, inputs: dict[str, str], gen: Generator, steerx: SteerXConfig) -> dict[str, str]:
    """Plan influence rows with descriptions written from anchors at other τ (one side store per τ)."""
    if not tau_curve(config):
        return {}
    stores = {}
    for tau in sorted(set(config.methods.tau_grid) - {steerx.tau}):
        store = storage.join(config.out, "tau-sweep", f"tau-{tau:g}")
        summary = refresh.main(_refresh_config(config, inputs, store, dataclasses.replace(steerx, tau=float(tau)),
                                               side_store=True))
        gen.influence_at_tau(StoreReader(store, config.storage, summary["version"]).steerx(gen.users), float(tau))
        stores[f"{tau:g}"] = f"{store} (version {summary['version']})"
    return stores


def with_main_tau(rows: list[dict], tau: float, include: bool) -> list[dict]:
    """The store's own τ on the τ curve: the recommended influence rows again, as the τ sweep's point at ``tau``."""
    if not include:
        return rows
    main = [dict(r, parameter="tau", strength=float(tau), recommended=False)
            for r in rows if r["method"] == "influence" and r["recommended"]]
    return rows + main
