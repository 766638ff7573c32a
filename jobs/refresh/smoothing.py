"""The smoothing stage as a pipeline: units → engine passes (HF actors or vLLM) → validation → one row per user.

The prompts, the validation of descriptions and the per-batch functions are operators
(``steerstore.operators.smoothing``); this module only schedules them on Ray Data.
"""

from __future__ import annotations

from typing import Sequence

from steerstore.operators.runtime import ModelConfig
from steerstore.operators.runtime.sources import resolve_model_path
from steerstore.operators.smoothing import (
    VARIANTS,
    HFGenerate,
    SmoothingConfig,
    group_users,
    reprompt_units,
    unit_rows,
    valid_units,
    validated_units,
)


def hf_engine(model: ModelConfig, config: SmoothingConfig, actors: dict):
    """Dataset of rows with ``prompt`` -> plus ``text``: HF generation on a pool of model actors."""
    return lambda ds: ds.map_batches(HFGenerate, fn_constructor_kwargs={"model": model, "config": config},
                                     **dict(actors, batch_size=config.batch_size))


def vllm_engine(model: ModelConfig, config: SmoothingConfig):
    """Dataset of rows with ``prompt`` -> plus ``text``: vLLM through a ``ray.data.llm`` processor."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    config.check_engine()
    path = resolve_model_path(model.name_or_path)
    keep = ("key", "user_id", "item_id", "anchor_words", "outputs", "attempts", "variant", "prompt")
    return build_processor(
        vLLMEngineProcessorConfig(model_source=path, batch_size=config.batch_size, concurrency=config.vllm_concurrency,
                                  engine_kwargs={"max_model_len": config.vllm_max_model_len,
                                                 "trust_remote_code": model.trust_remote_code}),
        preprocess=lambda row: dict(row, messages=[{"role": "user", "content": row["prompt"]}],
                                    sampling_params={"temperature": config.temperature, "top_p": config.top_p,
                                                     "seed": config.seed, "max_tokens": config.max_new_tokens}),
        postprocess=lambda row: dict({k: row[k] for k in keep}, text=row["generated_text"], engine_model_id=path,
                                     engine_model_fingerprint=f"vllm:{path}"))


def smooth(users, config: SmoothingConfig, engine, specials: Sequence[str], num_partitions: int = 8):
    """The smoothing stage: users (user_id, anchors, histories) -> one SMOOTHING_OUTPUT_SCHEMA row per user.

    ``engine`` maps a dataset of rows with ``prompt`` to the same rows plus ``text`` (and the
    engine's model id/fingerprint): ``hf_engine`` or ``vllm_engine``. Every unit gets attempt 1;
    the invalid ones get attempt 2 with the next prompt variant. A user is ``ok`` with at least
    one valid description; otherwise quarantined with the first unit's last reason.
    """
    variants = list(VARIANTS) if config.excerpts else ["anchors"]
    kw = {"config": config, "specials": list(specials)}
    pending = users.select_columns(["user_id", "anchors", "histories"]).map_batches(
        unit_rows, fn_kwargs=dict(kw, variant=variants[0]), batch_format="pyarrow")
    finished = []
    for n, variant in enumerate(variants):
        if n:
            pending = pending.map_batches(reprompt_units, fn_kwargs=dict(kw, variant=variant), batch_format="pyarrow")
        checked = engine(pending).map_batches(validated_units, fn_kwargs=kw, batch_format="pyarrow").materialize()
        if n == len(variants) - 1:
            finished.append(checked)  # the last round keeps its invalid units: they carry the reasons
            break
        finished.append(checked.map_batches(valid_units, fn_kwargs={"valid": True}, batch_format="pyarrow"))
        pending = checked.map_batches(valid_units, fn_kwargs={"valid": False}, batch_format="pyarrow").materialize()
        if pending.count() == 0:
            break
    cols = ["user_id", "item_id", "anchor_words", "attempts", "variant", "description", "reason",
            "engine_model_id", "engine_model_fingerprint"]
    done = finished[0].select_columns(cols)
    for more in finished[1:]:
        done = done.union(more.select_columns(cols))
    return done.groupby("user_id", num_partitions=num_partitions).map_groups(group_users, batch_format="pyarrow")
