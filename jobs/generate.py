"""Generate with a user's steering vectors: unsteered and steered side by side.

Launch: ``steerstore generate --store ./steerstore-out/store --user enthusiastic-0 --prompt "Tell me about cats."``
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from infra.config import check, option
from infra.reader import FingerprintMismatch, StoreReader, UserVectors  # noqa: F401  (re-exported)
from infra.storage import StorageConfig
from operators.runtime import HeadContrast, Influence, ModelConfig, ModelRuntime, Steering


@dataclass
class GenerateConfig:
    store: str = option("./steerstore-out/store", help="store URI (local folder or s3://bucket/prefix)")
    user: str = option("", help="user id to steer for")
    prompt: str = option("", help="the prompt to answer")
    method: Literal["caa", "bt", "population", "dps", "steerx"] = option(
        "caa", help="caa: the user's CAA direction; bt: their BT ideal point composed with the basis; population: "
                    "the population direction; dps: differential preference decoding against the user's heads; "
                    "steerx: the user's style (see --backbone)")
    backbone: Literal["influence", "vector"] = option(
        "influence", help="steerx: influence decoding with the user's style description, or their style vector")
    source: str | None = option(None, help="steerx vector: history | description | blend; default: the store's")
    lam: float = option(1.0, help="steerx influence: λ (0 = the description in the prompt, no amplification)")
    temperature: float = option(0.6, help="steerx influence: temperature of the combined log-probabilities")
    alpha: float | None = option(None, help="steering multiplier; default: the store's recommended scale for the method")
    gamma: float | None = option(None, help="dps: contrast strength γ; default: the store's recommended γ")
    layers: list[int] = option([], help="layers to steer; default: the store's recommended layers")
    max_new_tokens: int = option(60, help="tokens to generate")
    version: str | None = option(None, help="store version; default LATEST")
    model: str | None = option(None, help="model to load; default: the one the store was built with")
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig, metadata={"help": "object storage"})

    def __post_init__(self) -> None:
        check(bool(self.user), "--user is required")
        check(bool(self.prompt), "--prompt is required")
        check(self.max_new_tokens >= 1, "--max_new_tokens must be >= 1")


def load_runtime_for(reader: StoreReader, model: str | None = None) -> ModelRuntime:
    """The model the store was built with (or ``model``), refusing weights that differ."""
    name = model or reader.manifest["model"]["name_or_path"]
    runtime = ModelRuntime(ModelConfig(name_or_path=name))
    reader.check_model(runtime.fingerprint, f"model {name!r}")
    return runtime


def steering_for(users: list[UserVectors | None], alphas: list[float | None] | None = None,
                 layers: list[int] | None = None) -> Steering:
    """Per-row steering for a batch of users (``None`` = unsteered row)."""
    present = [u for u in users if u is not None]
    if not present:
        raise ValueError("no user in the batch has vectors")
    use = layers or present[0].recommended_layers
    hidden = present[0].vectors.shape[1]
    vectors = {l: torch.zeros(len(users), hidden) for l in use}
    scales = torch.zeros(len(users))
    for i, u in enumerate(users):
        if u is None:
            continue
        for l, v in u.at(use).items():
            vectors[l][i] = torch.from_numpy(v)
        alpha = alphas[i] if alphas and alphas[i] is not None else u.recommended_scale
        scales[i] = alpha
    return Steering(vectors, scales, positions=present[0].positions)  # type: ignore[arg-type]


def _missing(reader: StoreReader, user: str, what: str) -> KeyError:
    status = reader.users([user]).to_pylist()
    why = f"it is quarantined: {status[0]['reason']}" if status else "it was not in the inputs"
    if status and status[0]["status"] == "stored":
        why = f"its artifacts are {status[0]['methods']}"
    return KeyError(f"user {user!r} has no {what} in store version {reader.version}: {why}")


def _generate_dps(config: GenerateConfig, reader: StoreReader) -> dict:
    found = reader.dps([config.user])
    if config.user not in found:
        raise _missing(reader, config.user, "DPS heads")
    user = found[config.user]
    if not user.heads:
        raise KeyError(f"user {config.user!r} has no preference heads with a positive score (and no cluster "
                       f"heads) in store version {reader.version}: DPS would decode unsteered")
    runtime = load_runtime_for(reader, config.model)
    gamma = config.gamma if config.gamma is not None else user.gamma
    contrast = HeadContrast([[], user.heads], gamma=[0.0, gamma], adaptive=user.adaptive,
                            plausibility=user.plausibility)
    plain, steered = runtime.generate([config.prompt, config.prompt], config.max_new_tokens, contrast=contrast)
    print(f"store version {reader.version} · user {config.user} · method dps ({user.source} heads, "
          f"{user.pcs_baseline} baseline) · heads {user.heads} · gamma {gamma:g}")
    print(f"prompt: {config.prompt}")
    print(f"  unsteered: {plain}")
    print(f"  steered:   {steered}")
    return {"unsteered": plain, "steered": steered, "gamma": gamma, "heads": user.heads}


def _generate_influence(config: GenerateConfig, reader: StoreReader) -> dict:
    found = reader.steerx([config.user])
    if config.user not in found or not found[config.user]["context"]:
        raise _missing(reader, config.user, "SteerX style description")
    row = found[config.user]
    runtime = load_runtime_for(reader, config.model)
    influence = Influence(["", row["context"]], lam=[0.0, config.lam], temperature=config.temperature,
                          template=row["style_template"])
    plain, steered = runtime.generate([config.prompt, config.prompt], config.max_new_tokens, influence=influence)
    print(f"store version {reader.version} · user {config.user} · method steerx (influence decoding) "
          f"· lambda {config.lam:g} · T {config.temperature:g}")
    print(f"style: {row['context']}")
    print(f"prompt: {config.prompt}")
    print(f"  unsteered: {plain}")
    print(f"  steered:   {steered}")
    return {"unsteered": plain, "steered": steered, "context": row["context"], "lam": config.lam}


def main(config: GenerateConfig) -> dict:
    reader = StoreReader(config.store, config.storage, config.version)
    if config.method == "dps":
        return _generate_dps(config, reader)
    if config.method == "steerx" and config.backbone == "influence":
        return _generate_influence(config, reader)
    if config.method == "population":
        population = reader.population()
        found = {config.user: population} if population is not None else {}
    else:
        found = reader.bt([config.user]) if config.method == "bt" else \
            reader.vectors([config.user], method=config.method, source=config.source)
    if config.user not in found:
        raise _missing(reader, config.user, "vectors")
    user = found[config.user]
    runtime = load_runtime_for(reader, config.model)
    steer = steering_for([None, user], [None, config.alpha], config.layers or None)
    plain, steered = runtime.generate([config.prompt, config.prompt], config.max_new_tokens, steer=steer)
    alpha = float(steer.scales[1])
    layers = sorted(steer.vectors)
    method = f"steerx style vector ({config.source or 'store default'} source)" if config.method == "steerx" \
        else config.method
    print(f"store version {reader.version} · user {config.user} · method {method} · layers {layers} "
          f"· alpha {alpha:g}")
    print(f"prompt: {config.prompt}")
    print(f"  unsteered: {plain}")
    print(f"  steered:   {steered}")
    return {"unsteered": plain, "steered": steered, "alpha": alpha, "layers": layers}
