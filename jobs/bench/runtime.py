"""Throughput and MFU of the runtime's model passes at a given model shape (an 8B-class GPU figure).

Launch: ``steerstore bench runtime --shape llama-3.1-8b`` on a GPU node (randomly initialised
weights of that shape in bf16 with SDPA: speed does not depend on the values), or ``--shape
smollm2-135m`` / ``--shape tiny`` on a CPU. The tokenizer is the packaged default model's (its
ids fit any of these vocabularies); only lengths matter here.

Every pass the refresh makes is measured on sequences shaped like a typical user's (preference
pairs of ~``pair_tokens`` tokens, history items of ~``item_tokens`` tokens scored behind
``context_items`` other items):

- **capture**: block-output activations at every layer (``activations``, the CAA / style-vector pass);
- **scoring**: per-token log-probabilities of responses (``token_logprobs``, leave-one-out scoring);
- **ablation**: exact single-head ablations forked at their block (``ablation_nll``, DPS PCS);
- **attribution**: one forward + backward for head-gate gradients (``head_attribution``, DPS fast mode);
- **decode**: greedy generation, plain and with DPS's two-branch head contrast (``generate``).

FLOPs count the decoder blocks (2 per parameter per token, the attention scores and mixing
causally) plus the LM head where it runs; a backward pass counts twice its forward. MFU is the
achieved rate over the device's dense bf16 peak (when known). ``fte_per_s`` (forward-token-
equivalents per second: one token through the whole model) turns a per-user count of model work
into GPU-seconds: ``users_per_gpu_hour`` uses ``user_fte`` (the cost issue's count for a typical
user with all methods on today).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Literal

import torch

from steerstore.infra.config import check, option
from steerstore.jobs.bench.common import best_of, device_info, naive_response_logprobs, write_figures
from steerstore.operators.runtime import Encoded, HeadContrast, ModelConfig, ModelRuntime
from steerstore.operators.runtime.sources import DEFAULT_MODEL, resolve_model_path

# model shapes (Hugging Face LlamaConfig fields); the weights are random
SHAPES: dict[str, dict] = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152, max_position_embeddings=4096, tie_word_embeddings=True),
}
# dense bf16 peak FLOP/s by device name fragment (for MFU)
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
PASSES = ("capture", "scoring", "ablation", "attribution", "decode")


@dataclass
class BenchRuntimeConfig:
    shape: Literal["llama-3.1-8b", "smollm2-135m", "tiny"] = option(
        "tiny", help="model shape, randomly initialised (llama-3.1-8b on a GPU)")
    tokenizer: str = option(DEFAULT_MODEL, help="tokenizer: the packaged default model, or a folder holding one")
    users: int = option(8, help="users whose sequences one measurement covers")
    pairs: int = option(10, help="preference pairs per user (capture: 2 sequences each)")
    pair_tokens: int = option(225, help="tokens per pair sequence")
    items: int = option(8, help="history items per user (scoring: 2 conditions each)")
    item_tokens: int = option(150, help="tokens per history item's response")
    context_items: int = option(4, help="other items in front of a scored item (its context)")
    ablation_heads: int = option(32, help="heads ablated exactly per sequence (DPS fast mode verifies 32)")
    ablation_items: int = option(2, help="items per user scored with every ablated head")
    decode_rows: int = option(32, help="prompts decoded in one batch")
    decode_tokens: int = option(64, help="tokens generated per prompt")
    naive_sequences: int = option(16, help="scoring baseline: this many sequences one at a time, full forward with "
                                           "the LM head at every position (what a plain script does)")
    passes: list[str] = option(list(PASSES), help=f"passes to measure, among {list(PASSES)}")
    user_fte: float = option(127_000.0, help="forward-token-equivalents of one typical user (for users/GPU-hour)")
    repeats: int = option(2, help="timed repeats per pass (the best is reported; one warm-up before)")
    seed: int = option(0, help="seed of the random token ids and weights")
    json: str = option("docs/figures/bench-runtime.json", help="where the figures are written ('' = print only)")
    model: ModelConfig = dataclasses.field(default_factory=lambda: ModelConfig(max_batch_tokens=16384),
                                           metadata={"help": "dtype, device, attention kernel, batch token budget"})

    def __post_init__(self) -> None:
        check(set(self.passes) <= set(PASSES) and bool(self.passes), f"passes must be among {list(PASSES)}")
        check(min(self.users, self.pairs, self.items, self.decode_rows, self.decode_tokens, self.repeats) >= 1,
              "counts must be >= 1")
        check(self.ablation_heads >= 1 and self.ablation_items >= 1, "ablation_heads and ablation_items must be >= 1")


def build_runtime(config: BenchRuntimeConfig) -> ModelRuntime:
    """A randomly initialised model of ``config.shape`` on the configured device and dtype."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from steerstore.operators.runtime.loading import resolve_device, resolve_dtype

    device = resolve_device(config.model)
    dtype = resolve_dtype(config.model, device)
    torch.manual_seed(config.seed)
    shape = LlamaConfig(**SHAPES[config.shape], attn_implementation=config.model.attn_implementation)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the weights in the target dtype, on the device: no fp32 copy of 8B
    try:
        with torch.device(device):
            model = LlamaForCausalLM(shape)
    finally:
        torch.set_default_dtype(previous)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.tokenizer))
    name = f"random:{config.shape}"
    return ModelRuntime(dataclasses.replace(config.model, name_or_path=name), model=model, tokenizer=tokenizer)


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(n)]


def workload(config: BenchRuntimeConfig, vocab: int) -> dict[str, list[Encoded]]:
    """Token sequences shaped like ``users`` typical users' (prompts ~30 tokens)."""
    rng = random.Random(config.seed)
    prompt = 30
    pairs = [Encoded(_ids(rng, config.pair_tokens, vocab), prompt)
             for _ in range(2 * config.pairs * config.users)]
    context = config.context_items * (config.item_tokens + prompt)
    scored = [Encoded(_ids(rng, context + prompt + config.item_tokens, vocab), context + prompt)
              for _ in range(2 * config.items * config.users)]  # factual and counterfactual conditions
    ablation = scored[: config.ablation_items * config.users]
    return {"pairs": pairs, "scored": scored, "ablation": ablation}


def forward_flops(rt: ModelRuntime, encoded: list[Encoded], lm_head_tokens: int) -> float:
    """FLOPs of one forward over ``encoded``: blocks (2 per parameter per token, causal attention) + LM head."""
    blocks = sum(p.numel() for layer in rt.layers for p in layer.parameters())
    vocab = rt.model.get_output_embeddings().weight.shape[0]
    total = 0.0
    for e in encoded:
        s = len(e.ids)
        total += 2.0 * blocks * s + 2.0 * rt.num_layers * rt.hidden_size * s * s  # QKᵀ and AV, causal
    return total + 2.0 * rt.hidden_size * vocab * lm_head_tokens


def _response_tokens(encoded: list[Encoded]) -> int:
    return sum(len(e.ids) - e.prompt_len for e in encoded)


def _measure(name: str, fn, flops: float, tokens: float, config: BenchRuntimeConfig, peak: float | None,
             fte: float | None = None) -> dict:
    fn()  # warm-up: kernels, allocator
    seconds, _ = best_of(fn, config.repeats)
    out = {"seconds": round(seconds, 4), "tokens": int(tokens), "tokens_per_s": round(tokens / seconds, 1),
           "tflops_per_s": round(flops / seconds / 1e12, 2)}
    if fte is not None:
        out["fte_per_s"] = round(fte / seconds, 1)
    if peak:
        out["mfu"] = round(flops / seconds / peak, 3)
    if torch.cuda.is_available():
        out["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        torch.cuda.reset_peak_memory_stats()
    print(f"{name:<12} {out}", flush=True)
    return out


def main(config: BenchRuntimeConfig) -> dict:
    rt = build_runtime(config)
    vocab = rt.model.get_output_embeddings().weight.shape[0]
    work = workload(config, vocab)
    info = device_info(rt)
    peak = next((v for k, v in PEAK_BF16.items() if k in info.get("gpu", "")), None) \
        if rt.device.type == "cuda" and "bfloat16" in info["dtype"] else None
    per_token = forward_flops(rt, [Encoded([0] * 1024, 1023)], 0) / 1024  # at a 1k-token context
    result: dict = {**info, "shape": config.shape, "num_layers": rt.num_layers, "hidden_size": rt.hidden_size,
                    "num_heads": rt.num_heads, "num_kv_heads": rt.num_kv_heads,
                    "parameters": sum(p.numel() for p in rt.model.parameters()),
                    "max_batch_tokens": config.model.max_batch_tokens, "attn": config.model.attn_implementation,
                    "peak_flops_per_s": peak, "forward_flops_per_token_1k_ctx": per_token,
                    "workload": {k: len(v) for k, v in work.items()}, "passes": {}}
    passes = result["passes"]
    layers = list(range(rt.num_layers))
    if "capture" in config.passes:
        seqs = work["pairs"]
        text = rt.tokenizer.batch_decode([e.ids for e in seqs])
        cut = [rt.tokenizer.decode(e.ids[: e.prompt_len]) for e in seqs]
        prompts, responses = cut, [t[len(c):] or "x" for t, c in zip(text, cut)]
        enc = rt.encode(prompts, responses)
        tokens = sum(len(e.ids) for e in enc)
        passes["capture"] = _measure("capture", lambda: rt.activations(prompts, responses, layers),
                                     forward_flops(rt, enc, 0), tokens, config, peak, fte=tokens)
    if "scoring" in config.passes:
        seqs = work["scored"]
        tokens = sum(len(e.ids) for e in seqs)
        passes["scoring"] = _measure("scoring", lambda: rt.token_logprobs(seqs),
                                     forward_flops(rt, seqs, _response_tokens(seqs)), tokens, config, peak,
                                     fte=tokens)
        if config.naive_sequences:
            few = seqs[: config.naive_sequences]
            few_tokens = sum(len(e.ids) for e in few)
            naive = _measure("scoring-naive", lambda: [naive_response_logprobs(rt, e) for e in few],
                             forward_flops(rt, few, sum(len(e.ids) for e in few)), few_tokens, config, peak)
            passes["scoring"]["naive_baseline"] = naive
            passes["scoring"]["speedup_vs_naive"] = round(passes["scoring"]["tokens_per_s"] / naive["tokens_per_s"], 2)
    if "ablation" in config.passes:
        seqs = work["ablation"]
        heads = [(l, h) for l in range(rt.num_layers) for h in range(rt.num_heads)]
        heads = random.Random(config.seed).sample(heads, min(config.ablation_heads, len(heads)))
        # each head's variant runs the blocks from its layer on: (L - l) / L of a forward each, plus the base
        share = 1 + sum((rt.num_layers - l) / rt.num_layers for l, _ in heads)
        tokens = sum(len(e.ids) for e in seqs)
        passes["ablation"] = _measure("ablation", lambda: rt.ablation_nll(seqs, heads),
                                      share * forward_flops(rt, seqs, _response_tokens(seqs)), tokens * share,
                                      config, peak, fte=tokens * share)
        passes["ablation"]["heads"] = len(heads)
    if "attribution" in config.passes:
        seqs = work["ablation"]
        tokens = sum(len(e.ids) for e in seqs)
        flops = 3 * forward_flops(rt, seqs, _response_tokens(seqs))  # backward = 2 forwards
        passes["attribution"] = _measure(
            "attribution", lambda: rt.head_attribution(seqs, [0] * len(seqs), 1), flops, tokens, config, peak,
            fte=3 * tokens)
    if "decode" in config.passes:
        rt.eos_token_ids = []  # every row decodes exactly decode_tokens: the same work in every arm
        rng = random.Random(config.seed + 1)
        prompts = [rt.tokenizer.decode(_ids(rng, 60, min(vocab, len(rt.tokenizer)))) for _ in range(config.decode_rows)]
        generated = config.decode_rows * config.decode_tokens
        plain = _measure("decode", lambda: rt.generate(prompts, config.decode_tokens), 0.0, generated, config, None)
        heads = [[(rt.num_layers // 2, 0), (rt.num_layers // 2, 1)]] * len(prompts)
        contrast = _measure("decode-dps", lambda: rt.generate(prompts, config.decode_tokens,
                                                              contrast=HeadContrast(heads, gamma=1.0)),
                            0.0, generated, config, None)
        for d in (plain, contrast):
            d.pop("tflops_per_s", None)
        passes["decode"] = {"plain": plain, "dps_contrast": contrast, "rows": config.decode_rows,
                            "new_tokens": config.decode_tokens,
                            "dps_overhead": round(contrast["seconds"] / plain["seconds"], 2)}
    if "scoring" in passes:
        fte_rate = passes["scoring"]["fte_per_s"]
        result["user_fte"] = config.user_fte
        result["gpu_seconds_per_user_at_scoring_rate"] = round(config.user_fte / fte_rate, 3)
        result["users_per_gpu_hour_at_scoring_rate"] = round(3600 * fte_rate / config.user_fte, 1)
    write_figures(result, config.json)
    return result


if __name__ == "__main__":  # python -m steerstore.jobs.bench.runtime: on a GPU node without Ray installed
    import argparse

    from steerstore.infra.config import add_arguments, load

    parser = argparse.ArgumentParser(prog="python -m steerstore.jobs.bench.runtime", description=__doc__.split("\n")[0])
    add_arguments(parser, BenchRuntimeConfig)
    main(load(BenchRuntimeConfig, None, parser.parse_args()))
