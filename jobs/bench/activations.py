"""Benchmark of the CAA activation stage: batched capture vs a plain per-sequence loop, one run.

Launch: ``steerstore bench activations`` (the default model on this machine's device). The baseline is what a
plain script does: one sequence at a time, a full forward with ``output_hidden_states=True``
(every layer, the LM head over every position), then the mean over response tokens. Both run
in the same process on the same pairs; the figures are ratios against that baseline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from steerstore.infra.config import check, option
from steerstore.jobs.bench.common import best_of, device_info, write_figures
from steerstore.jobs.demo_data import demo_pairs
from steerstore.operators.caa import CAAConfig, pair_differences
from steerstore.operators.runtime import ModelConfig, ModelRuntime


@dataclass
class BenchConfig:
    pairs: int = option(64, help="preference pairs to process (2 sequences each)")
    repeats: int = option(2, help="timed repeats of each variant (the best is reported)")
    threads: int | None = option(None, help="torch CPU threads; default torch's")
    json: str = option("docs/figures/bench-activations.json", help="where the figures are written ('' = print only)")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "the model"})

    def __post_init__(self) -> None:
        check(self.pairs >= 1 and self.repeats >= 1, "pairs and repeats must be >= 1")


@torch.inference_mode()
def naive_differences(runtime: ModelRuntime, pairs: list[dict], layers: list[int]) -> torch.Tensor:
    """Reference: batch 1, full forward with all hidden states, mean over the response tokens."""
    out = []
    for p in pairs:
        sides = []
        for response in (p["chosen"], p["rejected"]):
            enc = runtime.encode([p["prompt"]], [response])[0]
            ids = torch.tensor([enc.ids], device=runtime.device)
            hs = runtime.model(input_ids=ids, output_hidden_states=True).hidden_states
            sides.append(torch.stack([hs[l + 1][0, enc.prompt_len:].float().mean(0) for l in layers]).cpu())
        out.append(sides[0] - sides[1])
    return torch.stack(out)


def main(config: BenchConfig) -> dict:
    if config.threads:
        torch.set_num_threads(config.threads)
    runtime = ModelRuntime(config.model)
    layers, _ = CAAConfig().resolve_layers(runtime.num_layers)
    pool = demo_pairs(users_per_style=4, pairs_per_user=16)
    pairs = [p for p in pool if isinstance(p.get("pair_id"), str) and p["chosen"]][: config.pairs]
    tokens = sum(len(e.ids) for e in runtime.encode(
        [p["prompt"] for p in pairs] * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]))
    naive_differences(runtime, pairs[:2], layers)  # warm-up
    t_naive, ref = best_of(lambda: naive_differences(runtime, pairs, layers), config.repeats)
    t_batched, got = best_of(lambda: pair_differences(runtime, pairs, layers, "mean"), config.repeats)
    max_diff = float((torch.as_tensor(got) - ref).abs().max())
    result = {
        **device_info(runtime), "pairs": len(pairs), "sequences": 2 * len(pairs), "tokens": tokens,
        "layers": f"{layers[0]}..{layers[-1]} of {runtime.num_layers}",
        "naive_seconds": round(t_naive, 3), "batched_seconds": round(t_batched, 3),
        "naive_tokens_per_s": round(tokens / t_naive, 1), "batched_tokens_per_s": round(tokens / t_batched, 1),
        "speedup": round(t_naive / t_batched, 2), "max_abs_diff": max_diff,
    }
    write_figures(result, config.json)
    return result
