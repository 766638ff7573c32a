"""What every benchmark shares: a timer that synchronises the GPU, plain reference computations,
and where figures are written (``docs/figures/<name>.json``, linked from the README)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch

from steerstore.operators.runtime import Encoded, ModelRuntime

T = TypeVar("T")


def best_of(fn: Callable[[], T], repeats: int = 1) -> tuple[float, T]:
    """(the fastest of ``repeats`` wall-clock runs in seconds, the last result); CUDA is synchronised."""
    best, result = float("inf"), None
    for _ in range(max(1, repeats)):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result  # type: ignore[return-value]


@torch.inference_mode()
def naive_response_logprobs(runtime: ModelRuntime, encoded: Encoded) -> torch.Tensor:
    """What a plain script does: batch 1, a full forward (LM head at every position); log p per response token."""
    logits = runtime.model(input_ids=torch.tensor([encoded.ids], device=runtime.device)).logits[0].float()
    logp = torch.log_softmax(logits[encoded.prompt_len - 1:-1], -1)
    targets = torch.tensor(encoded.ids[encoded.prompt_len:], device=runtime.device)
    return logp.gather(-1, targets[:, None]).squeeze(-1).double().cpu()


def device_info(runtime: ModelRuntime) -> dict:
    """Model, device and dtype of a run (every figure file records them)."""
    info = {"model": runtime.model_id, "device": str(runtime.device),
            "dtype": str(next(runtime.model.parameters()).dtype).replace("torch.", ""),
            "threads": torch.get_num_threads()}
    if runtime.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(runtime.device)
    return info


def latency_percentiles(seconds: list[float]) -> dict:
    """p50 / p99 in milliseconds of measured latencies (seconds), and how many there were."""
    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "n": len(seconds)}


def write_figures(result: dict, path: str, cfg=None, quiet: bool = False) -> None:
    """Print the figures as JSON (unless ``quiet``) and write them to ``path`` (local or s3://; '' = print only)."""
    text = json.dumps(result, indent=2, default=str)
    if not quiet:
        print(text)
    if not path:
        return
    if "://" in path:
        from steerstore.infra import storage  # object storage only when asked: the GPU bench runs without pyarrow

        storage.write_text(path, text + "\n", cfg)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
