"""The reference serving path: personalise one batch of requests from many users and methods.

Each request names a user, a prompt and a method; the store supplies the user's artifacts and
every request of the batch is decoded together (one forward per step for the whole micro-batch):

- ``none``: unsteered;
- ``caa`` / ``bt`` / ``population``: add α·v to the residual stream at the vector's recommended
  layers (BT: the user's ideal point composed with the basis; population: the population
  direction), from the response on or everywhere as the vector says;
- ``style_vector``: the user's SteerX style vector (γ·v; source history | description | blend);
- ``influence``: SteerX influence decoding with the user's style description S (λ);
- ``dps``: differential preference decoding against the user's preference heads (γ);
- ``recommended``: the method and strength the refresh chose for this user on their held-out items, in
  the request's condition (``history`` when it carries the user's history, else ``plain``); a user
  without a choice gets the population's (the manifest's ``recommend``), a version without either
  ``none``. The request is then planned exactly as one naming that method, strength, layers and
  source (so it may give none of them); ``Served.resolved`` names the method and ``note`` whose
  choice it was. The HTTP endpoint and ``steerstore generate`` default to it when the version
  records recommendations (``default_method``).

A user the store has nothing for gets the population vector for the vector methods and plain
decoding for ``influence`` and ``dps``; ``Served.applied`` says which was used and why.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from steerstore.infra.follow import StoreFollower
from steerstore.infra.reader import StoreReader, UserArtifacts, UserVectors
from steerstore.operators.history import HistoryContextConfig, history_prompt
from steerstore.operators.runtime import HeadContrast, Influence, ModelConfig, ModelRuntime, Sampling, Steering
from steerstore.schemas.methods import STRENGTH, VECTOR_METHODS, Family, Method, Source

# the methods a store's artifacts are served with (``recommended`` resolves to one of them per user)
METHODS: tuple[str, ...] = tuple(m.value for m in Method if m != Method.RECOMMENDED)
REQUEST_METHODS: tuple[str, ...] = (*METHODS, Method.RECOMMENDED.value)  # what a request may name
DEFAULT_LAMBDA = 1.0  # influence strength when a request gives none and the store records no λ
DEFAULT_INFLUENCE_TEMPERATURE = 0.6
# influence decoding only picks tokens the plain prompt gives >= this share of its top token's probability
DEFAULT_INFLUENCE_PLAUSIBILITY = 0.1


@dataclass
class Request:
    """One generation request: whose, what, and how strongly (None = the store's recommendation).

    ``method`` defaults to ``none`` here (a library call says what it wants); the HTTP endpoint and the CLI
    give a request that names no method ``default_method(reader)``: ``recommended`` when the store version
    records recommendations. ``recommended`` takes no ``scale``, ``layers`` or ``source``: they are the choice.
    """

    user_id: str
    prompt: str
    method: Method | str = "none"  # a Method (or its name)
    scale: float | None = None  # α (caa, bt, population), γ (style_vector, dps) or λ (influence)
    source: str | None = None  # style_vector: history | description | blend (default: the store's)
    layers: list[int] | None = None  # vector methods: layers to steer (default: the vector's recommended)
    # the user's retrieved history items ({"input", "output"}), shown before the prompt the way the refresh
    # showed history when it chose DPS heads (history_prompt); any method, e.g. none = history in prompt
    history: list[dict] | None = None


@dataclass
class Served:
    """A request's output and what was applied to produce it."""

    text: str
    user_id: str
    method: str  # as requested
    applied: Literal["user", "population", "none"]  # the user's own artifact, the fallback, or nothing
    scale: float | None  # the strength used (None when nothing was applied)
    layers: list[int] | None = None  # steered layers (vector methods)
    note: str | None = None  # why a fallback was used (recommended: whose choice it was)
    version: str | None = None  # the store version the request was served from (one per batch)
    resolved: str | None = None  # the method the request was planned as (recommended: the one it resolved to)


class BadRequest(ValueError):
    """A request the serving path cannot run (unknown method, empty prompt, ...)."""


SOURCES: tuple[str, ...] = tuple(s.value for s in Source)


def check_request(r: object) -> None:
    """Raise ``BadRequest`` saying what is wrong with one request (nothing is read or decoded)."""
    if not isinstance(r, Request):
        raise BadRequest(f"a {type(r).__name__}, expected a serving.Request")
    if r.method not in REQUEST_METHODS:
        raise BadRequest(f"unknown method {r.method!r}; methods: {', '.join(REQUEST_METHODS)}")
    if not isinstance(r.prompt, str) or not r.prompt.strip():
        raise BadRequest("the prompt must be non-empty text")
    if r.scale is not None and (isinstance(r.scale, bool) or not isinstance(r.scale, (int, float))
                                or not math.isfinite(r.scale)):
        raise BadRequest(f"scale must be a finite number, got {r.scale!r}")
    if r.layers is not None and (not isinstance(r.layers, (list, tuple)) or not r.layers
                                 or any(isinstance(l, bool) or not isinstance(l, int) or l < 0 for l in r.layers)):
        raise BadRequest(f"layers must be a non-empty list of layer numbers, got {r.layers!r}")
    if r.history is not None and (not isinstance(r.history, (list, tuple)) or not all(
            isinstance(h, dict) and isinstance(h.get("input"), str) and isinstance(h.get("output"), str)
            and h["output"].strip() for h in r.history)):
        raise BadRequest("history must be a list of the user's items, each {\"input\": text, \"output\": "
                         "non-empty text}")
    if r.method == Method.RECOMMENDED:
        given = [name for name in ("scale", "layers", "source") if getattr(r, name) is not None]
        if given:
            raise BadRequest(f"{' and '.join(given)} cannot be given with method recommended: the method, strength, "
                             "layers and source are the store's choice for the user (name a method to set them)")
    if r.source is not None and (r.method != "style_vector" or r.source not in SOURCES):
        raise BadRequest(f"source applies to method style_vector only and is one of {', '.join(SOURCES)}; "
                         f"got {r.source!r} with method {r.method!r}")
    if r.layers is not None and r.method not in VECTOR_METHODS:
        raise BadRequest(f"layers apply to the vector methods ({', '.join(VECTOR_METHODS)}), not {r.method!r}")


def request_prompt(r: Request, history_chars: int = 600) -> str:
    """The prompt a request is decoded from: its history items (if any) before it, in the refresh's template."""
    if not r.history:
        return r.prompt
    return history_prompt(list(r.history), r.prompt, HistoryContextConfig(context_chars=history_chars))


def _check(requests: Sequence[Request]) -> None:
    for k, r in enumerate(requests):
        try:
            check_request(r)
        except BadRequest as exc:
            raise BadRequest(f"request {k}: {exc}") from None


def vector_steering(rows: Sequence[tuple[UserVectors, float, Sequence[int]] | None]) -> Steering:
    """Per-row steering from stored vectors: row i adds ``scale · v`` at its layers from its
    vector's positions; a None row is unsteered. At least one row must have a vector."""
    present = [r for r in rows if r is not None]
    if not present:
        raise ValueError("no row of the batch has a vector to steer with")
    hidden = present[0][0].vectors.shape[1]
    layers = sorted({l for _, _, use in present for l in use})
    vectors = {l: torch.zeros(len(rows), hidden) for l in layers}
    scales = torch.zeros(len(rows))
    positions = ["response"] * len(rows)  # unsteered rows (scale 0) are left alone either way
    for i, entry in enumerate(rows):
        if entry is None:
            continue
        user, scale, use = entry
        for l, v in user.at(use).items():
            vectors[l][i] = torch.tensor(v)
        scales[i] = scale
        positions[i] = user.positions
    return Steering(vectors, scales, positions)  # type: ignore[arg-type]


class _Plan:
    """Per-row decoding settings of one batch, built request by request."""

    def __init__(self, n: int):
        self.vectors: list[tuple[UserVectors, float, list[int]] | None] = [None] * n
        self.contexts: list[str | None] = [None] * n
        self.lam = [0.0] * n
        self.template: str | None = None
        self.heads: list[list[tuple[int, int]] | None] = [None] * n
        self.gamma = [0.0] * n
        self.dps_settings: tuple[bool, float] | None = None

    def steering(self) -> Steering | None:
        return vector_steering(self.vectors) if any(v is not None for v in self.vectors) else None

    def influence(self, temperature: float, plausibility: float = DEFAULT_INFLUENCE_PLAUSIBILITY) -> Influence | None:
        if all(c is None for c in self.contexts):
            return None
        return Influence(self.contexts, lam=self.lam, temperature=temperature, template=self.template,
                         plausibility=plausibility)

    def contrast(self) -> HeadContrast | None:
        if all(h is None for h in self.heads):
            return None
        adaptive, plausibility = self.dps_settings
        return HeadContrast(self.heads, gamma=self.gamma, adaptive=adaptive, plausibility=plausibility)


def recommended_lambda(reader: StoreReader, composed: bool = False) -> float:
    """Influence decoding's λ when a request gives none: the store's (chosen on validation items; ``composed``:
    the one chosen on top of retrieved history, when the store has one), else 1."""
    stored = reader.composed_choice("influence")[1] if composed else None
    stored = reader.influence_lambda() if stored is None else stored
    return DEFAULT_LAMBDA if stored is None else stored


def recommended_setting(reader: StoreReader, method: str, source: str | None, vec: UserVectors,
                        composed: bool) -> tuple[list[int], float]:
    """The layers and strength of a vector request that names none: the vector's own recommendation, or, served
    on top of retrieved history (``composed``), the store's choice in that condition (when it has one)."""
    layers, scale = list(vec.recommended_layers), vec.recommended_scale
    if not composed:
        return layers, scale
    chosen_layers, chosen_scale = reader.composed_choice(method, source)
    if chosen_layers and all(l in vec.layers for l in chosen_layers):
        layers = chosen_layers
    return layers, scale if chosen_scale is None else chosen_scale


def _vector_for(req: Request, art: UserArtifacts, reader: StoreReader) -> tuple[UserVectors | None, str | None]:
    """The vector a vector-method request uses (the user's, else the population's) and why it fell back."""
    if req.method == "population":
        return art.population, None
    if req.method == "caa":
        own = art.caa
    elif req.method == "bt":
        own = art.bt
    else:
        own = art.style_vectors.get(req.source or reader.default_source(Family.STEERX))
    if own is not None:
        return own, None
    why = art.reason if art.status != "found" else f"user has no {req.method} artifact in this store version"
    return art.population, why


SYMBOLS = {"alpha": "α", "gamma": "γ", "lambda": "λ"}


def default_method(reader: StoreReader, otherwise: str = Method.CAA.value) -> str:
    """The method of a request that names none (HTTP endpoint, CLI): ``recommended`` when the version records
    recommendations (the manifest's ``recommend``), else ``otherwise`` (what they served before)."""
    return Method.RECOMMENDED.value if reader.manifest.get("recommend") else otherwise


def describe(method: str, source: str | None = None, scale: float | None = None,
             layers: Sequence[int] | None = None) -> str:
    """'dps γ=1.5', 'style_vector (history) γ=0.5 at layers [3]': a method and its settings in words."""
    text = str(method) + (f" ({source})" if source else "")
    if scale is not None and method in STRENGTH:
        text += f" {SYMBOLS[STRENGTH[method]]}={scale:g}"
    return text + (f" at layers {list(layers)}" if layers else "")


def resolve_recommended(reader: StoreReader, req: Request, art: UserArtifacts) -> tuple[Request, str]:
    """The explicit request a ``recommended`` one runs as, and a note saying whose choice it is: the user's
    ``recommended`` row for the request's condition, else the population's choice, else ``none``."""
    condition = "history" if req.history else "plain"
    where = " on top of their history" if req.history else ""
    row = art.recommended.get(condition)
    if row is not None and row["chosen_by"] == "user":
        n = int(row.get("items") or 0)
        who, why = f"recommended for this user{where}", f"chosen on {n} held-out item{'s' * (n != 1)}"
    elif row is not None:
        who, why = f"the population's choice{where}", "no held-out items for this user"
    else:
        row = reader.population_recommendation().get(condition)
        who, why = f"the population's choice{where}", f"no choice for this user in store version {reader.version}"
    if row is None:
        return dataclasses.replace(req, method="none"), (
            f"store version {reader.version} recommends nothing for the {condition} condition: unsteered")
    method = row.get("method") or "none"
    if method not in METHODS:
        return dataclasses.replace(req, method="none"), (
            f"{who} is {method!r}, which this steerstore does not know (upgrade steerstore): unsteered")
    source = row.get("source") if method == "style_vector" and row.get("source") in SOURCES else None
    scale = None if method == "none" or row.get("scale") is None else float(row["scale"])
    layers = [int(l) for l in row["layers"]] if method in VECTOR_METHODS and row.get("layers") else None
    explicit = dataclasses.replace(req, method=method, scale=scale, layers=layers, source=source)
    if layers:  # stored for the user's vector: a vector without them (e.g. the population's) uses its own
        vec, fallback = _vector_for(explicit, art, reader)
        if vec is not None and fallback is None and not set(layers) <= set(vec.layers):
            explicit.layers = None
    return explicit, f"{who}: {describe(method, source, scale, explicit.layers)} ({why})"


def plan_requests(reader: StoreReader, requests: Sequence[Request],
                  ) -> tuple[_Plan, list[Served]]:
    """Resolve each request against the store: the batch's decoding plan and each row's record."""
    _check(requests)
    plan = _Plan(len(requests))
    served: list[Served] = []
    for i, req in enumerate(requests):
        record = Served("", req.user_id, req.method, "none", None, version=reader.version, resolved=str(req.method))
        served.append(record)
        if req.method == "none":
            continue
        art = reader.artifacts(req.user_id)
        chosen = None
        if req.method == Method.RECOMMENDED:
            req, chosen = resolve_recommended(reader, req, art)
            record.resolved = str(req.method)
        if req.method != "none":
            _plan_one(reader, plan, i, req, art, record)
        if chosen:
            record.note = chosen + (f"; {record.note}" if record.note else "")
    return plan, served


def _plan_one(reader: StoreReader, plan: _Plan, i: int, req: Request, art: UserArtifacts, record: Served) -> None:
    """Plan row ``i`` (a request of a concrete method other than none) and fill its record."""
    if req.method in ("caa", "bt", "population", "style_vector"):
        vec, why = _vector_for(req, art, reader)
        record.note = why
        if vec is None:
            record.note = (why + "; " if why else "") + "the store has no population vector: unsteered"
            return
        # the population vector standing in is served at the population's strength
        chosen_layers, chosen_scale = recommended_setting(
            reader, "population" if why is not None else req.method, req.source, vec, bool(req.history))
        layers = list(req.layers or chosen_layers)
        missing = [l for l in layers if l not in vec.layers]
        scale = float(req.scale) if req.scale is not None else chosen_scale
        if why is not None:  # the population vector stands in: the request's settings were for another
            if missing:
                layers = [l for l in layers if l in vec.layers] or list(vec.recommended_layers)
                why += f"; layers {missing} are not stored for the population vector, steering {layers}"
            if req.method == "style_vector" and req.scale is not None:  # γ of a style vector is no α
                scale = chosen_scale  # the population's α, chosen on top of history when the request has one
                why += f"; the population's α {scale:g} replaces γ {float(req.scale):g}"
            record.note = why
        elif missing:
            raise BadRequest(f"request {i} (user {req.user_id!r}, {req.method}): layers {missing} are not "
                             f"stored for this vector (stored: {vec.layers})")
        plan.vectors[i] = (vec, scale, layers)
        record.applied = "user" if why is None and req.method != "population" else "population"
        record.scale, record.layers = scale, layers
    elif req.method == "influence":
        row = art.steerx
        if row is None or not (row.get("context") or "").strip():
            record.note = art.reason or "user has no SteerX style description: unsteered"
            return
        if plan.template is not None and row["style_template"] != plan.template:
            raise BadRequest("influence requests of one batch must share the store's style template")
        plan.template = row["style_template"]
        plan.contexts[i] = row["context"]
        plan.lam[i] = float(req.scale) if req.scale is not None else recommended_lambda(reader, bool(req.history))
        record.applied, record.scale = "user", plan.lam[i]
    else:  # dps
        user = art.dps
        if user is None or not user.heads:
            record.note = art.reason or "user has no preference heads with a positive score: unsteered"
            return
        settings = (user.adaptive, user.plausibility)
        if plan.dps_settings is not None and settings != plan.dps_settings:
            raise BadRequest("dps requests of one batch must share adaptive/plausibility settings")
        plan.dps_settings = settings
        plan.heads[i] = user.heads
        if user.history_items and not req.history:
            record.note = (f"the heads were chosen with up to {user.history_items} history item(s) before each text; "
                           "this request shows none (pass the user's retrieved history)")
        plan.gamma[i] = float(req.scale) if req.scale is not None else user.gamma
        record.applied, record.scale = "user", plan.gamma[i]


def serve(runtime: ModelRuntime, reader: StoreReader, requests: Sequence[Request], max_new_tokens: int = 64,
          sampling: Sampling | None = None,
          influence_temperature: float = DEFAULT_INFLUENCE_TEMPERATURE,
          influence_plausibility: float = DEFAULT_INFLUENCE_PLAUSIBILITY) -> list[Served]:
    """Decode every request in one mixed batch with ``runtime`` (checked against the store's model)."""
    reader.check_model(runtime.fingerprint, f"model {runtime.model_id!r}")
    if not requests:
        return []
    plan, served = plan_requests(reader, requests)
    _, chars = reader.dps_history()
    texts = decode_plan(runtime, [request_prompt(r, chars) for r in requests], plan, max_new_tokens, sampling,
                        plan.influence(influence_temperature, influence_plausibility))
    for record, text in zip(served, texts):
        record.text = text
    return served


def decode_plan(runtime: ModelRuntime, prompts: Sequence[str], plan: _Plan, max_new_tokens: int,
                sampling: Sampling | None, influence: Influence | None) -> list[str]:
    """Decode a planned batch: every row with its own steering, head contrast or influence, in one call."""
    return runtime.generate(list(prompts), max_new_tokens, steer=plan.steering(), contrast=plan.contrast(),
                            influence=influence, sampling=sampling)


_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> weights fingerprint


def _runtime_for(model, tokenizer, reader: StoreReader) -> ModelRuntime:
    """A runtime around the caller's model with this store's prompt conventions (chat template,
    micro-batch budget). Building one is cheap; the weights fingerprint is hashed once per model
    object and held weakly, so the model is freed when the caller drops it."""
    if isinstance(model, ModelRuntime):
        return model
    stored = dict(reader.manifest.get("config", {}).get("model") or {})
    config = ModelConfig(name_or_path=reader.manifest["model"].get("id") or "served-model",
                         use_chat_template=bool(stored.get("use_chat_template", True)),
                         max_batch_tokens=int(stored.get("max_batch_tokens", 8192)))
    runtime = ModelRuntime(config, model=model, tokenizer=tokenizer)
    fingerprint = _FINGERPRINTS.get(model)
    if fingerprint is None:
        fingerprint = _FINGERPRINTS[model] = runtime.fingerprint
    runtime._fingerprint = fingerprint
    return runtime


def personalised_generate(model, tokenizer, requests: Sequence[Request], store: StoreReader | StoreFollower | str,
                          max_new_tokens: int = 64, sampling: Sampling | None = None,
                          influence_temperature: float = DEFAULT_INFLUENCE_TEMPERATURE) -> list[Served]:
    """Generate for a batch of requests of different users and methods with a Hugging Face model.

    ``model`` is a transformers causal LM (or a ``ModelRuntime``) with the weights the store was
    built for (refused otherwise: ``FingerprintMismatch``); it is put in eval mode with gradients
    off. ``store`` is a ``StoreReader`` (keep one per process: it caches lookups), a ``StoreFollower``
    (a long-lived server: each call is served wholly from the newest version it has switched to) or a
    store URI. Outputs come back in request order; each equals what serving that request alone gives.
    """
    if isinstance(store, StoreFollower):
        reader = store.current()
    else:
        reader = store if isinstance(store, StoreReader) else StoreReader(store)
    runtime = _runtime_for(model, tokenizer, reader)
    return serve(runtime, reader, requests, max_new_tokens, sampling, influence_temperature)
