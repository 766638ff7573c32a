"""Generate with the reference serving path: one user's answer unsteered and steered side by side,
or a JSONL file of requests from many users and methods served as one mixed batch.

Launch: ``steerstore generate --store ./steerstore-out/store --user enthusiastic-0 --prompt "Tell me about cats."``
or ``steerstore generate --store URI --requests requests.jsonl --out outputs.jsonl``
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from steerstore.infra.config import check, option
from steerstore.infra.reader import StoreReader, UserVectors
from steerstore.infra.records import jsonl_lines
from steerstore.infra.storage import StorageConfig, read_text, write_text
from steerstore.operators.runtime import ModelConfig, ModelRuntime, Steering
from steerstore.operators.serving import (
    DEFAULT_INFLUENCE_TEMPERATURE,
    REQUEST_METHODS,
    Request,
    Served,
    check_request,
    default_method,
    plan_requests,
    serve,
    vector_steering,
)
from steerstore.schemas.methods import STRENGTH, Family, Method

WHAT = {"caa": "vectors", "bt": "BT ideal point", "population": "population vector",
        "style_vector": "SteerX style vector", "influence": "SteerX style description",
        "dps": "DPS heads with a positive score"}


@dataclass
class GenerateConfig:
    store: str = option("./steerstore-out/store", help="store URI (local folder or s3://bucket/prefix)")
    user: str = option("", help="user id to steer for (with --prompt)")
    prompt: str = option("", help="the prompt to answer (with --user)")
    method: Method | None = option(
        None, help="none | caa: the user's CAA direction | bt: their BT ideal point composed with the basis | "
                   "population: the population direction | style_vector: their SteerX style vector | influence: "
                   "SteerX influence decoding with their style description | dps: differential preference "
                   "decoding against their heads | recommended: the method and strength the refresh chose for the "
                   "user (no --scale/--source/--layers). Default: recommended when the store version records "
                   "recommendations, else caa (with --requests: the method of lines that name none; else none)")
    scale: float | None = option(
        None, help="strength: α (caa, bt, population), γ (style_vector, dps) or λ (influence); default: the store's")
    source: str | None = option(None, help="style_vector: history | description | blend; default: the store's")
    layers: list[int] = option([], help="vector methods: layers to steer; default: the vector's recommended layers")
    temperature: float = option(DEFAULT_INFLUENCE_TEMPERATURE,
                                help="influence: temperature of the combined log-probabilities")
    fallback: bool = option(False, help="single user: serve the population fallback instead of refusing a user "
                                        "without the method's artifact")
    requests: str | None = option(
        None, help="JSONL of requests {user_id, prompt, method?, scale?, source?, layers?, history?} served as one "
                   "mixed batch (instead of --user/--prompt); unknown users get the fallback")
    out: str | None = option(None, help="with --requests: write the outputs as JSONL here (default: stdout)")
    max_new_tokens: int = option(60, help="tokens to generate")
    version: str | None = option(None, help="store version; default LATEST")
    model: str | None = option(None, help="model to load; default: the one the store was built with")
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig, metadata={"help": "object storage"})

    def __post_init__(self) -> None:
        if self.requests is None:
            check(bool(self.user), "--user is required (or --requests FILE)")
            check(bool(self.prompt), "--prompt is required (or --requests FILE)")
        else:
            check(not self.user and not self.prompt, "give --requests or --user/--prompt, not both")
        check(self.method is None or self.method in REQUEST_METHODS,
              f"--method must be one of {', '.join(REQUEST_METHODS)}")
        check(self.max_new_tokens >= 1, "--max_new_tokens must be >= 1")
        check(self.temperature > 0, "--temperature must be > 0")


def load_runtime_for(reader: StoreReader, model: str | None = None) -> ModelRuntime:
    """The model the store was built with (or ``model``), refusing weights that differ."""
    name = model or reader.manifest["model"]["name_or_path"]
    runtime = ModelRuntime(ModelConfig(name_or_path=name))
    reader.check_model(runtime.fingerprint, f"model {name!r}")
    return runtime


def steering_for(users: list[UserVectors | None], alphas: list[float | None] | None = None,
                 layers: list[int] | None = None) -> Steering:
    """Per-row steering for a batch of users (``None`` = unsteered row), every row at ``layers``
    (default: the first user's recommended layers) and α from ``alphas`` or the user's own."""
    present = [u for u in users if u is not None]
    if not present:
        raise ValueError("no user in the batch has vectors")
    use = layers or present[0].recommended_layers
    return vector_steering([
        None if u is None else (u, alphas[i] if alphas and alphas[i] is not None else u.recommended_scale, use)
        for i, u in enumerate(users)])


def read_requests(uri: str, storage: StorageConfig | None = None, default: str = "none") -> list[Request]:
    """Requests from a JSONL file (a line without a method gets ``default``); a bad line is an error naming it."""
    requests = []
    for n, row, problem in jsonl_lines(read_text(uri, storage)):
        try:
            if problem:
                raise ValueError(problem)
            unknown = set(row) - {f.name for f in dataclasses.fields(Request)}
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}")
            request = Request(**{"method": default, **row})
            check_request(request)  # BadRequest is a ValueError: reported with the line
            requests.append(request)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{uri} line {n}: {exc}") from None
    return requests


def _serve_file(config: GenerateConfig, reader: StoreReader) -> list[Served]:
    requests = read_requests(config.requests, config.storage,
                             str(config.method) if config.method else default_method(reader, "none"))
    runtime = load_runtime_for(reader, config.model)
    served = serve(runtime, reader, requests, config.max_new_tokens, influence_temperature=config.temperature)
    lines = "".join(json.dumps(dataclasses.asdict(s)) + "\n" for s in served)
    if config.out:
        write_text(config.out, lines, config.storage)
        print(f"store version {reader.version} · {len(served)} requests → {config.out}")
    else:
        print(lines, end="")
    return served


def main(config: GenerateConfig) -> dict | list[Served]:
    reader = StoreReader(config.store, config.storage, config.version)
    if config.requests:
        return _serve_file(config, reader)
    # a strength or layers without a method are for caa, the default before the store recommended methods
    method = str(config.method) if config.method else (
        "caa" if config.scale is not None or config.layers else default_method(reader))
    request = Request(config.user, config.prompt, method, config.scale, config.source, config.layers or None)
    if method == "recommended" and not config.fallback and reader.artifacts(config.user).status != "found":
        raise ValueError(reader.why_missing(config.user, "artifacts") + ". Pass --fallback to answer with the "
                         "population's choice (or unsteered) instead")
    _, (record,) = plan_requests(reader, [request])
    # a recommendation is always served as chosen (its note says whose); an explicit method the user lacks is refused
    if method not in ("none", "recommended") and record.applied != "user" and not (
            method == "population" and record.applied == "population"):
        if not config.fallback:
            raise ValueError(reader.why_missing(config.user, WHAT[method])
                             + ". Pass --fallback to answer with the population vector (or unsteered) instead")
    runtime = load_runtime_for(reader, config.model)
    plain, steered = serve(runtime, reader, [Request(config.user, config.prompt), request], config.max_new_tokens,
                           influence_temperature=config.temperature)
    resolved = steered.resolved or method
    source = (request.source if method != "recommended" else None) or reader.default_source(Family.STEERX)
    what = method + (f" ({source} source)" if method == "style_vector" else "")
    if method == "recommended":
        what += f" → {resolved}"
    details = [f"store version {reader.version}", f"user {config.user}", f"method {what}"]
    why = "" if method == "recommended" else f" ({steered.note})"  # a recommendation's note is printed below
    if steered.applied == "population" and resolved != "population":
        details.append(f"fallback: population vector{why}")
    if steered.layers:
        details.append(f"layers {steered.layers}")
    if steered.scale is not None and resolved in STRENGTH:
        details.append(f"{STRENGTH[resolved]} {steered.scale:g}")
    if steered.applied == "none" and resolved != "none":
        details.append(f"fallback: unsteered{why}")
    print(" · ".join(details))
    if method == "recommended":
        print(f"recommendation: {steered.note}")
    if resolved == "influence" and steered.applied == "user":
        print(f"style: {reader.steerx([config.user])[config.user]['context']}")
    if resolved == "dps" and steered.applied == "user":
        print(f"heads: {reader.dps([config.user])[config.user].heads}")
    print(f"prompt: {config.prompt}")
    print(f"  unsteered: {plain.text}")
    print(f"  steered:   {steered.text}")
    if resolved != "none" and steered.text == plain.text:
        strength = "" if steered.scale is None else f" ({steered.scale:g})"
        hint = "more --max_new_tokens" if method == "recommended" else "a larger --scale, or more --max_new_tokens"
        print(f"note: the steered answer equals the unsteered one at this strength{strength}; try {hint}")
    return {"unsteered": plain.text, "steered": steered.text, "scale": steered.scale, "layers": steered.layers,
            "applied": steered.applied, "method": method, "resolved": resolved}
