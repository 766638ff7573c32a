"""The embedded demo: synthetic users with known preferences -> refresh -> steered answers.

Launch: ``steerstore demo`` (or ``make demo``). Writes ``./steerstore-out/``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from steerstore.infra.cluster import RayConfig
from steerstore.infra.config import check, option
from steerstore.infra.reader import StoreReader
from steerstore.jobs import refresh
from steerstore.jobs.demo_data import DEMO_PROMPTS, write_demo_inputs
from steerstore.jobs.generate import load_runtime_for, steering_for
from steerstore.operators.dps import DPSConfig
from steerstore.operators.history import HistoryContextConfig
from steerstore.operators.runtime import HeadContrast, Influence, ModelConfig
from steerstore.operators.serving import DEFAULT_INFLUENCE_PLAUSIBILITY, DEFAULT_INFLUENCE_TEMPERATURE
from steerstore.operators.steerx import SteerXConfig
from steerstore.operators.style import STYLE_TEMPLATE, StyleVectorConfig


@dataclass
class DemoConfig:
    out: str = option("./steerstore-out", help="folder for the demo inputs and store")
    users_per_style: int = option(3, help="synthetic users per style (enthusiastic, formal)")
    pairs_per_user: int = option(10, help="preference pairs per synthetic user")
    histories_per_user: int = option(4, help="history items per synthetic user (for DPS; 0 skips DPS)")
    show_users: list[str] = option(["enthusiastic-0", "formal-0"], help="users whose steered answers are printed")
    max_new_tokens: int = option(48, help="tokens generated per answer")
    show_alpha: float = option(
        2.0, help="a second, fixed multiplier shown beside each user's recommended one (the chosen α is "
                  "conservative on the demo's few training pairs)")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "the model"})
    dps: DPSConfig = dataclasses.field(
        default_factory=lambda: DPSConfig(candidates=16, clusters=2, cluster_items=6, baseline_users=2, gamma=2.0,
                                          history=HistoryContextConfig(context_items=1, max_items=3)),
        metadata={"help": "DPS settings (sized for a CPU demo)"})
    steerx: SteerXConfig = dataclasses.field(
        default_factory=lambda: SteerXConfig(vectors=StyleVectorConfig(calibration_users=2, gamma_grid=[0.25, 0.5, 1.0])),
        metadata={"help": "SteerX settings (calibration sized for a CPU demo)"})
    ray: RayConfig = dataclasses.field(default_factory=RayConfig, metadata={"help": "Ray connection"})

    def __post_init__(self) -> None:
        check(self.users_per_style >= 1 and self.pairs_per_user >= 2, "demo needs >= 1 user per style, >= 2 pairs")


def main(config: DemoConfig) -> dict:
    out = Path(config.out)
    pairs, histories = write_demo_inputs(out / "inputs", users_per_style=config.users_per_style,
                                         pairs_per_user=config.pairs_per_user,
                                         histories_per_user=config.histories_per_user)
    refresh_config = refresh.RefreshConfig(
        inputs=refresh.InputsConfig(preference_pairs=str(pairs), histories=str(histories) if histories else None),
        output=refresh.OutputConfig(store=str(out / "store")), model=config.model, ray=config.ray, dps=config.dps,
        steerx=config.steerx)
    summary = refresh.main(refresh_config)
    print(f"\nstore version {summary['version']}: {summary['users_in']} users in -> {summary['users_stored']} stored, "
          f"{summary['users_quarantined']} quarantined; {summary['input_rows']} input rows, "
          f"{summary['rows_quarantined']} quarantined")

    reader = StoreReader(str(out / "store"))
    for row in reader.store.read_table("quarantine", reader.version).to_pylist():
        print(f"  quarantined [{row['stage']}] user={row['user_id']} record={row['record_id']}: {row['reason']}")
    found = reader.vectors(config.show_users)
    runtime = load_runtime_for(reader, config.model.name_or_path)
    # one batch: every prompt unsteered, then per shown user at the recommended and the fixed α
    # (different vectors and multipliers per row)
    shown = [u for u in config.show_users if u in found]
    rows = [(None, None, p) for p in DEMO_PROMPTS] + [
        (u, a, p) for u in shown for a in (found[u].recommended_scale, config.show_alpha) for p in DEMO_PROMPTS]
    steer = steering_for([found[u] if u else None for u, _, _ in rows], [a for _, a, _ in rows])
    answers = runtime.generate([p for _, _, p in rows], config.max_new_tokens, steer=steer)
    by_row = {row: a for row, a in zip(rows, answers)}
    print(f"\nCAA steering at layers {sorted(steer.vectors)}; greedy decoding; recommended α = "
          f"{found[shown[0]].recommended_scale:g} (chosen on training pairs), shown also at α = {config.show_alpha:g}")
    for prompt in DEMO_PROMPTS:
        print(f"\nprompt: {prompt}")
        print(f"  {'unsteered':<26}: {by_row[(None, None, prompt)]}")
        for u, a, p in rows:
            if u is not None and p == prompt:
                print(f"  {u + f' (α={a:g})':<26}: {by_row[(u, a, p)]}")
    answers = {f"{u}|{a}|{p}": ans for (u, a, p), ans in by_row.items()}
    heads = {u: h for u, h in reader.dps(shown).items() if h.heads}
    if heads:
        # DPS: one batch, each row contrasted against the model with its own user's heads ablated
        rows = [(u, p) for u in heads for p in DEMO_PROMPTS]
        contrast = HeadContrast([heads[u].heads for u, _ in rows], gamma=[heads[u].gamma for u, _ in rows],
                                plausibility=heads[shown[0]].plausibility if shown[0] in heads else 0.1)
        dps_answers = runtime.generate([p for _, p in rows], config.max_new_tokens, contrast=contrast)
        print("\nDPS differential decoding (each user's preference heads, γ from the store):")
        for u in heads:
            print(f"  {u}: heads {heads[u].heads} ({heads[u].source}, {heads[u].pcs_baseline} baseline), γ={heads[u].gamma:g}")
        for (u, p), ans in zip(rows, dps_answers):
            print(f"  [{u}] {p} -> {ans}")
            answers[f"{u}|dps|{p}"] = ans
    answers.update(_show_steerx(reader, runtime, shown, config))
    return {"summary": summary, "answers": answers}


def _show_steerx(reader: StoreReader, runtime, shown: list[str], config: DemoConfig) -> dict:
    """SteerX: anchors and description per user, then influence decoding and the style vector, one batch each."""
    rows = {u: r for u, r in reader.steerx(shown).items() if r["context"]}
    if not rows:
        return {}
    print("\nSteerX (anchor words from leave-one-out effects; style description by the smoothing LLM):")
    for u, r in rows.items():
        words = ", ".join(f"{a['word']} ({a['mean_effect']:.1f})" for a in r["anchors"][:6])
        print(f"  {u}: anchors {words}\n    description: {r['context']}")
    # one batch: per user and prompt, influence decoding at λ = 0 (S in the prompt) and λ = 1 (amplified)
    prompts = [(u, p, lam) for u in rows for p in DEMO_PROMPTS for lam in (0.0, 1.0)]
    influence = Influence([rows[u]["context"] for u, _, _ in prompts], lam=[lam for _, _, lam in prompts],
                          temperature=DEFAULT_INFLUENCE_TEMPERATURE, template=STYLE_TEMPLATE,
                          plausibility=DEFAULT_INFLUENCE_PLAUSIBILITY)
    influenced = runtime.generate([p for _, p, _ in prompts], config.max_new_tokens, influence=influence)
    vectors = reader.vectors(list(rows), method="steerx")
    pairs = [(u, p) for u in rows for p in DEMO_PROMPTS]
    steered = runtime.generate([p for _, p in pairs], config.max_new_tokens,
                               steer=steering_for([vectors.get(u) for u, _ in pairs])) if vectors else []
    out = {}
    print("  influence decoding (T=0.6; λ=0: the description in the prompt; λ=1: its influence amplified) and the")
    print("  style vector (blend source at the recommended layer and γ):")
    for k, (u, p) in enumerate(pairs):
        plain, amplified = influenced[2 * k], influenced[2 * k + 1]
        print(f"  [{u}] {p}\n    influence λ=0: {plain}\n    influence λ=1: {amplified}")
        out[f"{u}|steerx-influence-0|{p}"] = plain
        out[f"{u}|steerx-influence-1|{p}"] = amplified
        if steered:
            print(f"    style vector:  {steered[k]}")
            out[f"{u}|steerx-vector|{p}"] = steered[k]
    return out
