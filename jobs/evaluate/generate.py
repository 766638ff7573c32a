"""Step 3 of the evaluation: every method's greedy outputs on the held-out items, at every strength."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass

import pyarrow.compute as pc

from steerstore.infra import storage
from steerstore.infra.reader import StoreReader, UserVectors
from steerstore.jobs import refresh
from steerstore.jobs.evaluate.config import LABELS, METHODS, EvalConfig, _refresh_config
from steerstore.jobs.evaluate.split import Split
from steerstore.jobs.generate import steering_for
from steerstore.operators.history import HistoryContextConfig, context_indices, history_prompt
from steerstore.operators.runtime import HeadContrast, Influence, ModelRuntime
from steerstore.operators.steerx import SteerXConfig
from steerstore.schemas.methods import Family

log = logging.getLogger("steerstore.eval")


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
        self.descriptions: dict = {}  # SteerX: how many evaluated users got a valid style description, and why not

    def _label(self, method: str) -> str:
        if method == "dps" and self.config.methods.dps_prompt == "history":
            base = self.baselines.get(method, "none")
            return f"{LABELS[method]} + history in prompt (Δ vs {LABELS[base]})"
        return LABELS[method]

    def _emit(self, settings_rows: list[tuple[Setting, dict]], outputs: list[str], prompts: list[str]) -> None:
        for (s, item), out, prompt in zip(settings_rows, outputs, prompts):
            self.rows.append({"method": s.method, "label": self._label(s.method), "parameter": s.parameter,
                              "strength": s.strength, "recommended": s.recommended, "user_id": item["user_id"],
                              "item_id": item["item_id"], "input": item["input"], "prompt": prompt,
                              "target": item["target"], "output": out})

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

    def _timed(self, method: str, fn) -> None:
        start = time.perf_counter()
        before = len(self.rows)
        fn()
        log.info("eval: %s: %d outputs in %.1f s", method, len(self.rows) - before, time.perf_counter() - start)

    def run(self) -> None:
        m = self.config.methods
        steps = {"none": self.none, "history_prompt": self.history, "caa": lambda: self.vectors("caa"),
                 "bt": lambda: self.vectors("bt"), "population": lambda: self.vectors("population"),
                 "influence": self.influence, "dps": self.dps}
        for source in ("history", "description", "blend"):
            steps[f"style_vector:{source}"] = lambda s=source: self.vectors(f"style_vector:{s}")
        for method in METHODS:
            if method in m.include:
                self._timed(method, steps[method])

    def none(self) -> None:
        prompts = [h["input"] for h in self.items]
        outs = self.runtime.generate(prompts, self.config.methods.max_new_tokens)
        self._emit([(Setting("none", "", math.nan, True), h) for h in self.items], outs, prompts)

    def _history_prompts(self, items: list[dict]) -> list[str]:
        """Each held-out input after the user's top-k training items by BM25 (the history-in-prompt baseline)."""
        m = self.config.methods
        ctx = HistoryContextConfig(context_items=m.history_k, selection="bm25", context_chars=m.history_chars)
        prompts = []
        for h in items:
            train = self.split.train[h["user_id"]]
            # the held-out item as the query after the training items: context_indices never picks it
            picked = context_indices([*train, {"input": h["input"]}], len(train), ctx)
            prompts.append(history_prompt([train[i] for i in picked], h["input"], ctx))
        return prompts

    def history(self) -> None:
        prompts = self._history_prompts(self.items)
        outs = self.runtime.generate(prompts, self.config.methods.max_new_tokens)
        self._emit([(Setting("history_prompt", "", math.nan, True), h) for h in self.items], outs, prompts)

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
        method = "influence"
        found = contexts if contexts is not None else self.reader.steerx(self.users)
        present = {u for u, r in found.items() if (r.get("context") or "").strip()}
        if tau is None:
            reasons = self._quarantined("steerx")
            items = self._mark_missing(method, present, "no SteerX style description (quarantined for SteerX)",
                                       reasons)
            why = Counter(self.missing.get(method, {}).values())
            self.descriptions = {"users": len(self.users), "with_description": len(present & set(self.users)),
                                 "without": dict(why.most_common())}
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
                              temperature=m.influence_temperature, template=template,
                              plausibility=m.influence_plausibility)
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
        # as in the paper: the contrast applied on top of the retrieved-history prompt, and compared with it
        prompts = self._history_prompts([h for _, h in rows]) if self.config.methods.dps_prompt == "history" \
            else [h["input"] for _, h in rows]
        outs = self.runtime.generate(prompts, self.config.methods.max_new_tokens, contrast=contrast)
        self._emit(rows, outs, prompts)

    @property
    def baselines(self) -> dict[str, str]:
        """method -> the method its Δ is taken against (else no personalisation)."""
        m = self.config.methods
        both = m.dps_prompt == "history" and "history_prompt" in m.include
        return {"dps": "history_prompt"} if both else {}


def _tau_sweep(config: EvalConfig, inputs: dict[str, str], gen: Generator, steerx: SteerXConfig) -> dict[str, str]:
    """Influence decoding with descriptions written from anchors at other τ (one side store per τ)."""
    if "influence" not in config.methods.include or not config.methods.sweeps:
        return {}
    stores = {}
    main_tau = steerx.tau
    main_rows = [r for r in gen.rows if r["method"] == "influence" and r["recommended"]]
    gen.rows.extend(dict(r, parameter="tau", strength=float(main_tau), recommended=False) for r in main_rows)
    for tau in sorted(set(config.methods.tau_grid) - {main_tau}):
        store = storage.join(config.out, "tau-sweep", f"tau-{tau:g}")
        summary = refresh.main(_refresh_config(config, inputs, store, dataclasses.replace(steerx, tau=float(tau)),
                                               side_store=True))
        reader = StoreReader(store, config.storage, summary["version"])
        gen.influence(contexts=reader.steerx(gen.users), tau=float(tau))
        stores[f"{tau:g}"] = f"{store} (version {summary['version']})"
    return stores
