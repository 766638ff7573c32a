"""Model work per user, counted: every per-user stage of the refresh on one typical synthetic user.

Launch: ``steerstore bench cost`` (a random model with the blocks and heads of ``--shape`` at a
tiny width: what is counted, tokens × decoder blocks, depends on the structure, not the weights
or the width), or ``--model smollm2-135m-instruct`` (a real model: real descriptions and real
stopping of generation; slow on a CPU).

The typical user (the cost issue's): ``items`` history items of ~``item_tokens`` output tokens
behind ~``input_tokens``-token inputs, ``pairs`` preference pairs of ~``pair_tokens`` tokens per
sequence, every method on with the default settings. The stages run exactly as the model
workers run them (``CAAVectors``, ``DPSHeads``, ``SteerXAnchors``, the smoothing LLM through
``describe``, ``SteerXStyleVectors``), with hooks on the decoder blocks counting:

- forward tokens × blocks run (a pass that stops early, or starts at a fork, counts its share);
- backward tokens × blocks (the gradient reaching each block's output: DPS attribution);
- decode steps (block calls on one new token with a KV cache) and prefill tokens.

A **forward-token-equivalent** (FTE) is one token through every block: (forward + 2 × backward)
block-tokens / blocks. For a model shape given without weights (``--shape llama-3.1-8b``) the FTEs
become FLOPs (2 per block parameter per token, causal attention from the counted sequence
lengths, LM head not counted), GPU-seconds at ``mfu`` of ``peak_tflops`` and users per GPU-hour.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import torch

from steerstore.infra.config import check, flatten_fields, from_dict, option, to_dict
from steerstore.jobs.bench.common import device_info, write_figures
from steerstore.operators.caa import CAAConfig
from steerstore.operators.dps import DPSConfig
from steerstore.operators.runtime import ModelConfig, ModelRuntime
from steerstore.operators.steerx import SteerXConfig

STAGES = ("caa", "dps", "steerx_loo", "smoothing", "style_vectors", "recommend")
_WORDS = ("river light morning quiet garden letter winter music paper window story careful bright small "
          "travel market simple coffee evening friend city ocean green mountain road").split()


@dataclass
class BenchCostConfig:
    model: str = option("tiny", help="'tiny': a random model with the shape's blocks and heads at a tiny width "
                                     "(counts at the shape, in a minute on a CPU); 'random': the shape itself with "
                                     "random weights (a GPU: measured seconds); or a model name / folder / hub id")
    users: int = option(1, help="typical users, batched per stage as the model workers batch them "
                                "(resources.caa_batch_size, dps_batch_size); figures are per user")
    tokenizer: str = option("", help="with --model random: the tokenizer (default: the packaged default model's)")
    dtype: str = option("auto", help="with --model random: model.dtype (auto = bfloat16 on CUDA)")
    items: int = option(8, help="history items of the typical user")
    item_tokens: int = option(150, help="tokens per history output")
    input_tokens: int = option(30, help="tokens per history input and pair prompt")
    pairs: int = option(10, help="preference pairs of the typical user")
    pair_tokens: int = option(225, help="tokens per pair sequence (prompt + response)")
    pool_users: int = option(8, help="other users whose items form SteerX's counterfactual pool")
    shape: str = option("llama-3.1-8b", help="model shape for FLOPs and GPU-seconds (a name of "
                                             "`bench runtime`'s shapes, or a Hugging Face config.json)")
    peak_tflops: float = option(989.4, help="device's dense bf16 peak, TFLOP/s (H100 SXM: 989.4)")
    mfu: float = option(0.4, help="model FLOPs utilisation assumed for GPU-seconds")
    seed: int = option(0, help="seed of the synthetic text")
    out: str = option("./steerstore-out/bench-cost", help="folder for the tiny model")
    json: str = option("docs/figures/bench-cost.json", help="where the figures are written ('' = print only)")
    # the refresh's own method sections (their defaults are the refresh's): a profile is counted as the
    # refresh would run it, e.g. --dps.candidates 8 --steerx.counterfactual_draw user
    caa: CAAConfig = dataclasses.field(default_factory=CAAConfig, metadata={"help": "CAA settings counted (refresh's caa)"})
    dps: DPSConfig = dataclasses.field(default_factory=DPSConfig, metadata={"help": "DPS settings counted (refresh's dps)"})
    steerx: SteerXConfig = dataclasses.field(default_factory=SteerXConfig,
                                             metadata={"help": "SteerX settings counted (refresh's steerx)"})

    def __post_init__(self) -> None:
        check(min(self.items, self.pairs) >= 2 and min(self.item_tokens, self.pair_tokens, self.input_tokens) >= 4,
              "items and pairs >= 2; token counts >= 4")
        check(0 < self.mfu <= 1 and self.peak_tflops > 0, "0 < mfu <= 1 and peak_tflops > 0")
        check(self.users >= 1, "users must be >= 1")


class BlockCounter:
    """Forward hooks on a model's decoder blocks that count the work each stage does."""

    def __init__(self, runtime: ModelRuntime):
        self.runtime = runtime
        self.layers = runtime.num_layers
        self.stage = "other"
        self.counts: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._handles = []

    def __enter__(self) -> "BlockCounter":
        self._handles = [block.register_forward_hook(self._forward) for block in self.runtime.layers]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def at(self, stage: str):
        previous, self.stage = self.stage, stage
        try:
            yield
        finally:
            self.stage = previous

    def _forward(self, module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        batch, length = int(hidden.shape[0]), int(hidden.shape[1])
        c = self.counts[self.stage]
        c["forward_block_tokens"] += batch * length
        if length == 1:
            c["decode_block_steps"] += batch
        else:
            c["attention_block_t2"] += batch * length * length  # Σ B·T² per block call: causal attention's work
        if hidden.requires_grad:
            stage = self.stage

            def backward(grad: torch.Tensor) -> None:
                self.counts[stage]["backward_block_tokens"] += int(grad.shape[0]) * int(grad.shape[1])
            hidden.register_hook(backward)

    def figures(self) -> dict[str, dict]:
        out = {}
        for stage, c in self.counts.items():
            fte = (c["forward_block_tokens"] + 2 * c["backward_block_tokens"]) / self.layers
            out[stage] = {"forward_token_equivalents": round(fte, 1),
                          "forward_tokens": round(c["forward_block_tokens"] / self.layers, 1),
                          "backward_tokens": round(c["backward_block_tokens"] / self.layers, 1),
                          "decode_steps": round(c["decode_block_steps"] / self.layers, 1),
                          "attention_t2": c["attention_block_t2"] / self.layers}
        return out


def _text(tokenizer, rng: random.Random, tokens: int) -> str:
    """Plain words, cut to about ``tokens`` tokens of ``tokenizer``."""
    words = " ".join(rng.choice(_WORDS) for _ in range(tokens * 2)).capitalize()
    ids = tokenizer(words, add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids).strip() + "."


def typical_user(config: BenchCostConfig, tokenizer, user_id: str = "typical", seed: int | None = None) -> dict:
    """A USER_ROW_SCHEMA-shaped row: the typical user's pairs and history items."""
    import datetime as dt

    rng = random.Random(config.seed if seed is None else seed)
    response = max(4, config.pair_tokens - config.input_tokens)
    pairs = [{"pair_id": f"p{k}", "prompt": _text(tokenizer, rng, config.input_tokens),
              "chosen": _text(tokenizer, rng, response), "rejected": _text(tokenizer, rng, response), "weight": 1.0}
             for k in range(config.pairs)]
    histories = [{"item_id": f"h{k}", "input": _text(tokenizer, rng, config.input_tokens),
                  "output": _text(tokenizer, rng, config.item_tokens),
                  "timestamp": dt.datetime(2026, 1, 1 + k, tzinfo=dt.timezone.utc)} for k in range(config.items)]
    return {"user_id": user_id, "status": "ok", "reason": None, "pairs": pairs, "histories": histories,
            "n_pairs_in": len(pairs), "n_histories_in": len(histories), "dropped": [],
            "content_fingerprint": f"bench:{user_id}", "bucket": 0}


_RANDOM: dict[tuple, ModelRuntime] = {}  # one random model per shape in a process (profiles compared in one run)


def _random(config: BenchCostConfig) -> ModelRuntime:
    """The shape with random weights on the best device (what `bench runtime` measures), shared by the operators."""
    from steerstore.jobs.bench.runtime import BenchRuntimeConfig, build_runtime
    from steerstore.operators.runtime.sources import DEFAULT_MODEL

    key = (config.shape, config.tokenizer, config.dtype, config.seed)
    if key not in _RANDOM:
        bench = BenchRuntimeConfig(shape=config.shape, tokenizer=config.tokenizer or DEFAULT_MODEL, seed=config.seed,
                                   model=ModelConfig(dtype=config.dtype, max_batch_tokens=8192))
        _RANDOM.clear()  # at most one 8B model held
        _RANDOM[key] = build_runtime(bench)
    return ModelRuntime.share(_RANDOM[key])


def _model(config: BenchCostConfig) -> ModelConfig:
    """The model the stages run on: ``tiny`` is a random model with the shape's blocks and heads at a tiny
    width (what is counted, tokens × blocks and heads, is the shape's; the compute is not)."""
    if config.model != "tiny":
        return ModelConfig(name_or_path=config.model)
    from steerstore.operators.runtime.tiny import save_tiny

    shape = shape_of(config.shape)
    heads = shape["num_attention_heads"]
    structure = dict(num_hidden_layers=shape["num_hidden_layers"], num_attention_heads=heads,
                     num_key_value_heads=shape.get("num_key_value_heads", heads), head_dim=4, hidden_size=4 * heads,
                     intermediate_size=8 * heads, max_position_embeddings=16384)
    folder = Path(config.out) / f"tiny-{_digest(structure)}"
    if not (folder / ".complete").exists():
        save_tiny(folder, corpus=[" ".join(_WORDS).capitalize() + "."], **structure)
        (folder / ".complete").touch()
    return ModelConfig(name_or_path=str(folder))


def _digest(value: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:10]


def run_stages(config: BenchCostConfig, model: ModelConfig, counter: BlockCounter | None = None) -> dict:
    """Every per-user stage on the typical user, as the model workers run them; returns the outputs' sizes."""
    from steerstore.jobs.refresh.config import RefreshConfig
    from steerstore.jobs.refresh.tables import style_inputs
    from steerstore.operators.caa import CAAVectors
    from steerstore.operators.dps import DPSHeads, dps_user_rows
    from steerstore.operators.smoothing import HFGenerate, describe, special_strings
    from steerstore.operators.steerx import SteerXAnchors
    from steerstore.operators.style import SteerXStyleVectors
    from steerstore.schemas.store import USER_ROW_SCHEMA

    from steerstore.jobs.refresh.workers import chunked

    rt = ModelRuntime.shared(model)
    cfg = from_dict(RefreshConfig, {"inputs": {"preference_pairs": "(none: one synthetic user)"},
                                    "caa": to_dict(config.caa), "dps": to_dict(config.dps),
                                    "steerx": to_dict(config.steerx)})  # the refresh's checks apply
    users = pa.Table.from_pylist([typical_user(config, rt.tokenizer, f"typical-{i}", seed=config.seed + 1000 * i)
                                  for i in range(config.users)], schema=USER_ROW_SCHEMA)
    pool = [{**h, "user_id": f"other-{u}"} for u in range(config.pool_users)
            for h in typical_user(config, rt.tokenizer, f"other-{u}", seed=config.seed + 1 + u)["histories"]]
    res = cfg.resources
    seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(name: str):
        _sync()
        start = time.perf_counter()
        with counter.at(name) if counter is not None else contextlib.nullcontext():
            yield
        _sync()
        seconds[name] = time.perf_counter() - start

    def statuses(table: pa.Table) -> dict:
        return dict(Counter(table.column("status").to_pylist()))

    out = {}
    with stage("caa"):
        out["caa"] = statuses(chunked(CAAVectors(cfg.caa, model), users, res.caa_batch_size))
    with stage("dps"):
        out["dps"] = statuses(chunked(DPSHeads(cfg.dps, model), dps_user_rows(users, cfg.dps.history),
                                      res.dps_batch_size))
    with stage("dps_attribution"):  # apart: a user's DPS work under dps.verify=departures when not verified
        rows = dps_user_rows(users, cfg.dps.history).to_pylist()
        for lo in range(0, len(rows), res.dps_batch_size):
            part = rows[lo:lo + res.dps_batch_size]
            enc = [rt.encode([q["prompt"] for q in r["sequences"]], [q["output"] for q in r["sequences"]])
                   for r in part]
            rt.head_attribution([e for es in enc for e in es], [u for u, es in enumerate(enc) for _ in es], len(part))
    with stage("steerx_loo"):
        anchors = chunked(SteerXAnchors(cfg.steerx, model, pool), users, res.caa_batch_size)
    out["steerx_loo"] = statuses(anchors)
    with stage("smoothing"):
        sm = cfg.steerx.smoothing
        described = describe(anchors.select(["user_id", "anchors", "histories"]), sm, HFGenerate(model, sm),
                             special_strings(rt.tokenizer))
    out["smoothing"] = statuses(described)
    descriptions = described.column("descriptions")
    with stage("style_vectors"):
        styled = chunked(SteerXStyleVectors(cfg.steerx, model), style_inputs(
            anchors.select(["user_id", "histories"]).append_column("descriptions", descriptions)),
            res.caa_batch_size)
    out["style_vectors"] = statuses(styled)
    with stage("recommend"):
        out["recommend"] = _recommend(rt, cfg, users, styled, described, config)
    return {"statuses": out, "seconds": seconds}


def _recommend(rt: ModelRuntime, cfg, users: pa.Table, styled: pa.Table, described: pa.Table,
               config: BenchCostConfig) -> dict:
    """The per-user choice's model work: each user's held-out item (one more typical item) scored under every
    candidate of both conditions (the artifacts' values do not change the work; their shapes and counts do)."""
    import numpy as np

    from steerstore.infra.reader import UserArtifacts, UserHeads, UserVectors
    from steerstore.operators import recommend as rec
    from steerstore.operators.smoothing import user_context

    layers = cfg.caa.resolve_layers(rt.num_layers)
    caa_layers, caa_rec = layers
    rng = np.random.default_rng(config.seed)
    vec = UserVectors("u", caa_layers, rng.normal(size=(len(caa_layers), rt.hidden_size)).astype(np.float32),
                      caa_rec, cfg.caa.scale, cfg.caa.apply_positions, "m", "fp", config.pairs)
    style_rows = {r["user_id"]: r for r in styled.to_pylist() if r["status"] == "ok"}
    contexts = {r["user_id"]: user_context(r["descriptions"] or []) for r in described.to_pylist()}
    heads = [(rt.num_layers // 2, h) for h in range(min(cfg.dps.top_k, rt.num_heads))]
    strengths = {c: rec.Strengths({"caa": cfg.caa.scale, "bt": cfg.caa.scale, "population": cfg.caa.scale},
                                  ([style_rows[next(iter(style_rows))]["layers"][0]], 1.0) if style_rows else None,
                                  cfg.steerx.vectors.source, list(cfg.steerx.vectors.lambda_grid))
                 for c in (("plain", "history") if cfg.scale.composed is not None else ("plain",))}
    cases = []
    for u in users.to_pylist():
        row = style_rows.get(u["user_id"])
        style = {} if row is None else {s: UserVectors(u["user_id"], row["layers"], np.asarray(row["vectors"][k], np.float32),
                                                       row["layers"][:1], 1.0, cfg.steerx.vectors.apply_positions, "m",
                                                       "fp", 0) for k, s in enumerate(row["sources"])}
        art = UserArtifacts(u["user_id"], "found", caa=vec, bt=vec, population=vec, style_vectors=style,
                            steerx={"context": contexts.get(u["user_id"], "")},
                            dps=UserHeads(u["user_id"], heads, "user", cfg.dps.gamma, cfg.dps.adaptive, 0.1, None, [],
                                          None, None, "fp"))
        held = typical_user(config, rt.tokenizer, f"held-{u['user_id']}", seed=config.seed + 7)["histories"][:1]
        cases.append(rec.UserCase(u["user_id"], held, u["histories"], rec.candidates(art, strengths, cfg.recommend)))
    scored = rec.score(rt, cases, cfg.scale.composed)
    return {"ok": len(scored)}


def changed_settings(config: BenchCostConfig) -> dict:
    """The method settings of this run that differ from the refresh's defaults ({} = the defaults)."""
    out = {}
    for name, default in (("caa", CAAConfig()), ("dps", DPSConfig()), ("steerx", SteerXConfig())):
        base = {n: v for n, _, _, v in flatten_fields(type(default), f"{name}.", default)}
        out.update({n: v for n, _, _, v in flatten_fields(type(default), f"{name}.", getattr(config, name))
                    if base[n] != v})
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def shape_of(name: str) -> dict:
    """A model shape: one of ``bench runtime``'s, or the fields of a Hugging Face config.json."""
    from steerstore.jobs.bench.runtime import SHAPES

    if name in SHAPES:
        return dict(SHAPES[name])
    import json

    return json.loads(Path(name).read_text())


def flops_per_fte(shape: dict) -> tuple[float, float]:
    """(FLOPs per forward-token-equivalent from the blocks' weights, FLOPs per unit of attention Σ T² per block)."""
    d, layers = shape["hidden_size"], shape["num_hidden_layers"]
    heads, kv = shape["num_attention_heads"], shape.get("num_key_value_heads", shape["num_attention_heads"])
    head_dim = shape.get("head_dim") or d // heads
    per_layer = d * heads * head_dim * 2 + d * kv * head_dim * 2 + 3 * d * shape["intermediate_size"]
    # QKᵀ and AV over the causal half: 2 matmuls × 2 FLOPs × T²/2 × heads·head_dim per block
    return 2.0 * per_layer * layers, 2.0 * heads * head_dim * layers


def main(config: BenchCostConfig) -> dict:
    if config.model == "random":
        rt = _random(config)  # held here: the shared registry keeps runtimes weakly
        model = rt.config
    else:
        model = _model(config)
        rt = ModelRuntime.shared(model)
    if rt.device.type == "cuda":
        # the same users once uncounted and untimed first: a GPU pays for every new batch shape once (kernel choice,
        # allocation). On an H200 a one-user warm-up left the first profile of a run 1.5-2.2x slower in its
        # non-DPS stages than the same stages run again; a worker that scores thousands of users pays it once.
        run_stages(config, model)
        torch.cuda.reset_peak_memory_stats()
    with BlockCounter(rt) as counter:
        ran = run_stages(config, model, counter)
    n = config.users
    stages = {k: {m: v / n for m, v in s.items()} for k, s in counter.figures().items()}
    attribution = stages.pop("dps_attribution")["forward_token_equivalents"]
    ran["seconds"].pop("dps_attribution", None)
    total = sum(s["forward_token_equivalents"] for s in stages.values())
    dps = stages["dps"]["forward_token_equivalents"]
    weights, attention = flops_per_fte(shape_of(config.shape))
    flops = {k: s["forward_token_equivalents"] * weights + s["attention_t2"] * attention for k, s in stages.items()}
    seconds = sum(flops.values()) / (config.peak_tflops * 1e12 * config.mfu)
    measured = sum(ran["seconds"].values()) / n
    order = sorted(stages, key=lambda k: STAGES.index(k) if k in STAGES else 99)
    result = {
        **device_info(rt), "num_layers": rt.num_layers, "users": n,
        **({"peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
           if rt.device.type == "cuda" else {}),
        "user": {"items": config.items, "item_tokens": config.item_tokens, "input_tokens": config.input_tokens,
                 "pairs": config.pairs, "pair_tokens": config.pair_tokens},
        "stages": {k: {**{m: round(v, 1) for m, v in stages[k].items() if m != "attention_t2"},
                       "status": ran["statuses"].get(k),
                       "share": round(stages[k]["forward_token_equivalents"] / max(total, 1e-9), 3),
                       "flops_at_shape": float(f"{flops[k]:.4g}"),
                       "seconds_per_user": round(ran["seconds"].get(k, 0.0) / n, 4)} for k in order},
        "total_forward_token_equivalents": round(total, 1),
        "settings": changed_settings(config),
        # dps.verify=departures: a user that agrees with its clusters costs the attribution only; the total at a
        # share of users verified (bench dps-cut's verified_share on real users) replaces DPS by
        # attribution + share × verification
        "dps_departures": {"attribution_fte": round(attribution, 1), "verification_fte": round(dps - attribution, 1),
                           "total_fte_at_verified_share": {str(share): round(total - dps + attribution
                                                                             + share * (dps - attribution), 1)
                                                           for share in (0.0, 0.25, 0.5, 0.75, 1.0)}},
        "at_shape": {"shape": config.shape, "flops_per_fte_blocks": float(f"{weights:.4g}"),
                     "flops_per_user": float(f"{sum(flops.values()):.4g}"), "peak_tflops": config.peak_tflops,
                     "mfu": config.mfu, "gpu_seconds_per_user": round(seconds, 3),
                     "users_per_gpu_hour": round(3600 / seconds, 1)},
        "measured": {"seconds_per_user": round(measured, 4), "users_per_hour": round(3600 / max(measured, 1e-9), 1),
                     "mfu": round(sum(flops.values()) / max(measured, 1e-9) / (config.peak_tflops * 1e12), 3)
                     if config.model == "random" else None},
        "notes": "block-tokens counted by hooks on the decoder blocks; LM head and embeddings not counted; decode "
                 "attention over the KV cache not counted; at_shape's GPU-seconds assume the stated MFU; measured: "
                 "this run's wall-clock on its device (with --model random: the shape itself, random weights)",
    }
    write_figures(result, config.json)
    return result
