"""Settings of the evaluation job: what data, which methods and strengths, and the refresh it runs.

The method names, their labels and the metric names live here because every step (split,
generate, score, write, the report) keys its rows by them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from steerstore.infra.cluster import RayConfig
from steerstore.infra.config import check, option
from steerstore.infra.storage import StorageConfig
from steerstore.jobs import devdata, refresh
from steerstore.operators.bt import BTConfig
from steerstore.operators.caa import CAAConfig
from steerstore.operators.dps import DPSConfig
from steerstore.operators.history import HistoryContextConfig
from steerstore.operators.metrics import METRICS as TEXT_METRICS
from steerstore.operators.metrics import MetricsConfig
from steerstore.operators.recommend import RecommendConfig
from steerstore.operators.runtime import ModelConfig
from steerstore.operators.scale import ScaleConfig
from steerstore.operators.serving import DEFAULT_INFLUENCE_PLAUSIBILITY
from steerstore.operators.steerx import SteerXConfig
from steerstore.operators.validate import ValidateConfig

# drift: 1 − BERTScore against the unsteered answer to the same prompt; perplexity: under the unsteered model
# given the prompt decoded from; perplexity_plain: given the plain input
METRICS = TEXT_METRICS + ("drift", "perplexity", "perplexity_plain")
LABELS = {
    "none": "no personalisation",
    "history_prompt": "history in prompt (BM25)",
    "style_vector:history": "SteerX style vector · history",
    "style_vector:description": "SteerX style vector · description",
    "style_vector:blend": "SteerX style vector · blend",
    "influence": "SteerX influence decoding",
    "population": "CAA population direction",
    "caa": "CAA (per-user)",
    "bt": "BT ideal point",
    "dps": "DPS heads",
}
# steering applied on top of the retrieved-history prompt, at the strengths the refresh chose in that condition
# (DPS is decoded on the history prompt by methods.dps_prompt)
COMPOSED = ("population", "caa", "bt", "style_vector:history", "style_vector:description", "style_vector:blend",
            "influence")
COMPOSED_SUFFIX = "+history"
LABELS.update({m + COMPOSED_SUFFIX: f"{LABELS[m]} + history in prompt" for m in COMPOSED})
# each user's recommended method and strength (chosen by the refresh on their own held-out training items), on the
# plain prompt and on top of the history prompt, resolved as serving resolves `recommended`; evaluated only when the
# store version records recommendations
RECOMMENDED = ("recommended", "recommended" + COMPOSED_SUFFIX)
LABELS.update({"recommended": "recommended per user", "recommended" + COMPOSED_SUFFIX:
               "recommended per user + history in prompt"})
METHODS = tuple(LABELS)
KEYS = ["method", "label", "parameter", "strength", "recommended"]  # one evaluated setting


@dataclass
class EvalDataConfig:
    histories: str = option("", help="user histories to split (JSONL/Parquet, local or s3://); empty: the dev data")
    heldout: str = option("", help="explicit held-out items (user_id, item_id, input, target), e.g. from "
                                   "`steerstore import --format lamp`; then histories are not split")
    preference_pairs: str = option("", help="preference pairs (split per user); empty: built from the histories")
    dev_dir: str = option("../shared/data", help="folder of the development data (used when histories is empty)")
    dev_sources: list[str] = option(["blogs", "synthpai"], help="development data sets")
    dev_users: int = option(8, help="development users per source (the first by id with enough items)")
    dev_partition: Literal["eval", "tune", "all"] = option(
        "eval", help="development users from this half only: eval (disjoint from the tune half that the defaults, "
                     "e.g. SteerX's τ, were chosen on), tune or all")
    dev_words: int = option(60, help="development targets: the continuation cut to this many words")
    heldout_items: int = option(2, help="held-out items per user")
    split: Literal["time", "seeded"] = option(
        "time", help="time: each user's last items by timestamp (seeded for users without timestamps); seeded")
    min_history: int = option(4, help="training items a user needs to be evaluated")
    max_history: int = option(12, help="most recent training items per user given to the refresh job")
    heldout_pairs: int = option(2, help="held-out preference pairs per user (when pairs are given)")
    pair_rejected: Literal["neutral", "other_user", "both"] = option(
        "neutral", help="built pairs (no preference_pairs given): the rejected text is the model's own greedy answer "
                        "to the same prompt (neutral) or another user's text for another prompt, from the same source "
                        "(other_user); both: neutral training pairs, and two held-out pairs per held-out item, one "
                        "of each kind (preference accuracy is reported pooled and per kind)")
    neutral_max_new_tokens: int = option(80, help="built pairs, neutral: tokens of the model's answer")
    seed: int = option(0, help="seed of the split and of the other-user continuations in built pairs")

    def __post_init__(self) -> None:
        check(self.heldout_items >= 1 and self.min_history >= 2 and self.max_history >= self.min_history,
              "data: heldout_items >= 1, min_history >= 2 and max_history >= min_history")
        check(self.heldout_pairs >= 1 and self.neutral_max_new_tokens >= 1,
              "data.heldout_pairs and data.neutral_max_new_tokens must be >= 1")
        check(set(self.dev_sources) <= set(devdata.SOURCES), f"data.dev_sources must be among {sorted(devdata.SOURCES)}")


@dataclass
class MethodsConfig:
    include: list[str] = option(list(METHODS), help=f"methods to evaluate, among {list(METHODS)}")
    max_new_tokens: int = option(64, help="tokens generated per held-out item (greedy)")
    history_k: int = option(2, help="history in prompt: training items shown (top-k by BM25 against the input)")
    history_chars: int = option(600, help="history in prompt: each shown item's output cut to this many characters")
    sweeps: bool = option(True, help="also evaluate the strength grids below (else recommended strengths only)")
    alpha_grid: list[float] = option([], help="CAA / BT α sweep; empty: the refresh's scale grid")
    gamma_grid: list[float] = option([], help="style-vector γ sweep; empty: steerx.vectors.gamma_grid")
    influence_lambda: float | None = option(
        None, help="influence decoding: the recommended λ (default: the store's, chosen by the refresh on its "
                   "calibration users' validation items; 1 when the store records none)")
    lambda_grid: list[float] = option([0.0, 0.5, 1.0, 2.0], help="influence λ sweep (0 = the description in the prompt)")
    influence_temperature: float = option(0.6, help="influence decoding: temperature inside the combination")
    influence_plausibility: float = option(
        DEFAULT_INFLUENCE_PLAUSIBILITY, help="influence decoding: only tokens the plain prompt gives at least this "
                                             "share of its top token's probability (keeps the answer on the prompt; 0: off)")
    dps_gamma_grid: list[float] = option([0.5, 1.0, 2.0, 4.0], help="DPS contrast γ sweep")
    dps_prompt: Literal["history", "plain"] = option(
        "history", help="DPS decodes the history-in-prompt prompt (the paper's setting; its Δ is then taken against "
                        "history in prompt when that is evaluated too) or the bare input (Δ against no personalisation)")
    ship_metric: Literal["meteor", "rougeL", "rouge1", "bleu", "bertscore"] = option(
        "meteor", help="the metric the 'what to ship' recommendation ranks settings by (lower CI bound of its Δ)")
    max_perplexity_ratio: float = option(
        1.5, help="what to ship: acceptable fluency, perplexity (given the prompt decoded from) at most this multiple "
                  "of the baseline's: no personalisation's, or history in prompt's for a method on top of it")
    tau_grid: list[float] = option(
        [], help="extra anchor thresholds τ: each reruns SteerX anchors + smoothing into a side store and is "
                 "evaluated by influence decoding at the recommended λ")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.include) - set(METHODS))
        check(not unknown, f"methods.include: unknown {unknown}; known: {list(METHODS)}")
        check(self.max_new_tokens >= 1 and self.history_k >= 1, "methods: max_new_tokens and history_k must be >= 1")
        check(0.0 <= self.influence_plausibility < 1.0, "methods.influence_plausibility must be in [0, 1)")
        check(self.max_perplexity_ratio > 0, "methods.max_perplexity_ratio must be > 0")

    @property
    def history_context(self) -> HistoryContextConfig:
        """How history in prompt shows a user's training items: the top ``history_k`` by BM25 against the input."""
        return HistoryContextConfig(context_items=self.history_k, selection="bm25", context_chars=self.history_chars)


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
    actors: int = option(1, help="Ray actors that decode and score the held-out rows (each loads the model and the "
                                 "scorers once; resources.cpus_per_actor / gpus_per_actor each); 0: in this process")
    batch_rows: int = option(128, help="planned rows per actor call: all settings of a few held-out items, every "
                                       "method decoded together in one mixed batch")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "the model"})
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig, metadata={"help": "object storage"})
    ray: RayConfig = dataclasses.field(default_factory=RayConfig, metadata={"help": "Ray connection"})
    validate: ValidateConfig = dataclasses.field(default_factory=lambda: ValidateConfig(max_tokens=768),
                                                 metadata={"help": "refresh: validation"})
    scale: ScaleConfig = dataclasses.field(default_factory=ScaleConfig, metadata={"help": "refresh: α choice"})
    caa: CAAConfig = dataclasses.field(default_factory=CAAConfig, metadata={"help": "refresh: CAA"})
    bt: BTConfig = dataclasses.field(default_factory=BTConfig, metadata={"help": "refresh: BT"})
    dps: DPSConfig = dataclasses.field(default_factory=DPSConfig, metadata={"help": "refresh: DPS"})
    steerx: SteerXConfig = dataclasses.field(default_factory=SteerXConfig, metadata={"help": "refresh: SteerX"})
    recommend: RecommendConfig = dataclasses.field(
        default_factory=RecommendConfig, metadata={"help": "refresh: the method and strength chosen per user"})
    resources: refresh.ResourcesConfig = dataclasses.field(default_factory=refresh.ResourcesConfig,
                                                           metadata={"help": "refresh: scheduling"})

    def __post_init__(self) -> None:
        check(self.examples >= 0, "examples must be >= 0")
        check(self.actors >= 0 and self.batch_rows >= 1, "actors must be >= 0 and batch_rows >= 1")


# ---- step 2: the refresh on the training split --------------------------------------------

def _refresh_config(config: EvalConfig, inputs: dict[str, str], store: str, steerx: SteerXConfig | None = None,
                    side_store: bool = False) -> refresh.RefreshConfig:
    steerx = dataclasses.replace(steerx or config.steerx, token_effects=True)
    rc = refresh.RefreshConfig(
        inputs=refresh.InputsConfig(preference_pairs=inputs["pairs"], histories=inputs["histories"]),
        output=refresh.OutputConfig(store=store), storage=config.storage, ray=config.ray, model=config.model,
        validate=config.validate, caa=config.caa, bt=config.bt, scale=config.scale, dps=config.dps, steerx=steerx,
        recommend=config.recommend, resources=config.resources,
        # the evaluation's own store serves nothing: only an empty version is refused, never a change against
        # the evaluation run before it (another split, other settings)
        publish=refresh.PublishConfig(max_users_drop=1.0, max_method_drop=1.0, max_quarantine_rise=1.0))
    if side_store:  # a τ-sweep store: SteerX anchors and descriptions only
        rc.bt = dataclasses.replace(config.bt, enabled=False)
        rc.dps = dataclasses.replace(config.dps, enabled=False)
        rc.scale = dataclasses.replace(config.scale, enabled=False)
        rc.recommend = dataclasses.replace(config.recommend, enabled=False)
        rc.steerx.vectors = dataclasses.replace(steerx.vectors, enabled=False)
    return rc


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
