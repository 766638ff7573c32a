"""Prove an export in the engine: llama.cpp runs the user's exported control vector, compared with the
Hugging Face reference path at the same layers, scale and positions.

Launch: ``steerstore verify-export --engine llama.cpp --store ./steerstore-out/store --user enthusiastic-0``
(``--method caa|bt|population|style_vector``). It exports the user's vectors as ``steerstore export``
does (GGUF, the store's recommended layers and scale), loads the model's GGUF file in llama.cpp and
applies the file through the binding's control-vector API (as ``--control-vector-scaled FILE SCALE``),
and steers the Hugging Face model with the store's vectors at every position (llama.cpp steers every
position, the prompt included). On each prompt (chat-templated token ids, the same for both engines):

- **Logit shift.** The next-token logit shift, steered − unsteered (each centred over the vocabulary),
  must have cosine ≥ ``--min_cosine`` with HF's. llama.cpp multiplies Q4_1 weights with 8-bit
  quantised activations while HF runs the same weights dequantised in float32, so the two engines'
  unsteered logits differ by a noise of norm ν (≈ 30 on SmolLM2's 49k logits); a shift of similar size
  cannot be resolved. The cosine is therefore taken at the least scale s₀·2^k (k ≤ 4, s₀ the store's
  scale or ``--scale``) at which HF's shift is at least ``--min_signal`` × ν on every prompt; the
  scale used is reported.
- **Greedy tokens** at s₀, the scale that is served: at each of the first ``--agree_tokens`` steps
  of HF's steered greedy continuation, llama.cpp (fed the same tokens) must choose HF's token, or one
  HF ranks within ``--tie_margin`` logits of it (a near tie that quantisation noise may flip). The
  free-running continuations of both engines are printed beside it.

The unsteered agreement is reported too. The figures are on the last line; the command exits non-zero
when they fall short.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from steerstore.infra.config import check, option
from steerstore.infra.reader import StoreReader, UserVectors
from steerstore.infra.storage import StorageConfig, write_text
from steerstore.jobs import export
from steerstore.jobs.demo_data import DEMO_PROMPTS
from steerstore.jobs.generate import load_runtime_for
from steerstore.operators.llamacpp import LlamaCpp
from steerstore.operators.runtime import ModelRuntime, Steering
from steerstore.operators.runtime.sources import packaged_gguf
from steerstore.schemas.methods import FAMILY_OF, VECTOR_METHODS, Method


@dataclass
class VerifyExportConfig:
    engine: Literal["llama.cpp"] = option("llama.cpp", help="the engine to run the export in")
    store: str = option("./steerstore-out/store", help="store URI (local folder or s3://bucket/prefix)")
    user: str = option("", help="the user whose export to verify (not with --method population)")
    method: Method = option(Method.CAA, help="caa | bt | population | style_vector (vector methods)")
    source: str | None = option(None, help="style_vector: history | description | blend; default: the store's")
    scale: float | None = option(None, help="control-vector scale s₀; default: the store's recommended scale (what "
                                            "the export prints for --control-vector-scaled)")
    prompts: list[str] = option(list(DEMO_PROMPTS), help="prompts to compare on (chat-templated)")
    new_tokens: int = option(8, help="greedy tokens decoded per prompt by each engine")
    agree_tokens: int = option(4, help="llama.cpp must choose HF's steered greedy token at this many first steps")
    tie_margin: float = option(0.5, help="a different choice HF ranks within this many logits of its own is a "
                                         "near tie, not a disagreement")
    min_cosine: float = option(0.9, help="least cosine of the logit shifts (steered − unsteered), every prompt")
    min_signal: float = option(4.0, help="the cosine is taken at a scale where HF's logit shift is at least this "
                                         "many times the engines' unsteered logit difference")
    gguf: str | None = option(None, help="the model as a GGUF file for llama.cpp; default: the packaged GGUF of "
                                         "the store's model (a store on another model needs this)")
    json: str | None = option(None, help="also write the figures as JSON here (local or s3://)")
    version: str | None = option(None, help="store version; default LATEST")
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig, metadata={"help": "object storage"})

    def __post_init__(self) -> None:
        check(self.engine == "llama.cpp", f"--engine must be llama.cpp, got {self.engine!r}")
        check(self.method in VECTOR_METHODS, f"--method must be a vector method: {', '.join(VECTOR_METHODS)}")
        if self.method == "population":
            check(not self.user, "--method population verifies the one population vector: drop --user")
        else:
            check(bool(self.user), "--user is required (or --method population)")
        check(bool(self.prompts) and all(p.strip() for p in self.prompts), "--prompts must be non-empty")
        check(self.new_tokens >= 1 and 1 <= self.agree_tokens <= self.new_tokens,
              "need --new_tokens >= 1 and 1 <= --agree_tokens <= --new_tokens")
        check(-1.0 <= self.min_cosine <= 1.0, "--min_cosine must be in [-1, 1]")
        check(self.min_signal > 0 and self.tie_margin >= 0, "need --min_signal > 0 and --tie_margin >= 0")
        check(self.scale is None or (math.isfinite(self.scale) and self.scale != 0), "--scale must be finite, not 0")


DOUBLINGS = 4  # the cosine's scale goes up to s₀·2^4 looking for a resolvable shift


def _centred(logits: np.ndarray) -> np.ndarray:
    return logits - logits.mean()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(np.dot(a, b) / (na * nb)) if na > 0 and nb > 0 else float("nan")


def _prefix(a: list[int], b: list[int]) -> int:
    """Leading tokens two continuations share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class _HF:
    """The reference: one sequence at a time, a full forward per step, steering at every position."""

    def __init__(self, rt: ModelRuntime, vectors: dict[int, np.ndarray]):
        self.rt = rt
        self.vectors = {l: torch.tensor(np.array(v, dtype=np.float32))[None] for l, v in vectors.items()}

    @torch.inference_mode()
    def next_logits(self, ids: list[int], scale: float) -> np.ndarray:
        input_ids, mask, pos = self.rt.collate([ids])
        if scale == 0:
            return self.rt.forward(input_ids, mask, pos, logits_to_keep=1).logits[0, -1].float().cpu().numpy()
        with self.rt.steering(Steering(self.vectors, torch.tensor([scale]), positions="all")):
            return self.rt.forward(input_ids, mask, pos, logits_to_keep=1).logits[0, -1].float().cpu().numpy()

    def greedy(self, ids: list[int], new_tokens: int, scale: float) -> tuple[list[int], list[np.ndarray]]:
        """The greedy continuation and the logits at each of its steps."""
        out: list[int] = []
        logits: list[np.ndarray] = []
        for _ in range(new_tokens):
            logits.append(self.next_logits(ids + out, scale))
            out.append(int(np.argmax(logits[-1])))
            if out[-1] in self.rt.eos_token_ids:
                break
        return out, logits


def _steps_agree(hf_tokens: list[int], hf_logits: list[np.ndarray], cpp_choices: list[int], k: int,
                 margin: float) -> tuple[int, int]:
    """(steps where llama.cpp chose HF's token, near ties) over the first ``k`` steps of HF's continuation;
    a step that is neither ends the count."""
    same = ties = 0
    for token, logits, choice in list(zip(hf_tokens, hf_logits, cpp_choices))[:k]:
        if choice == token:
            same += 1
        elif logits[token] - logits[choice] < margin:
            ties += 1
        else:
            break
    return same, ties


def _model_gguf(reader: StoreReader, config: VerifyExportConfig) -> Path:
    if config.gguf:
        path = Path(config.gguf)
        if not path.is_file():
            raise FileNotFoundError(f"--gguf {config.gguf}: no such file")
        return path
    name = reader.manifest["model"]["name_or_path"]
    try:
        return packaged_gguf(name)
    except ValueError:
        raise ValueError(f"the store's model {name!r} is not a packaged GGUF model: give --gguf PATH, the same "
                         "weights as a GGUF file (llama.cpp's convert_hf_to_gguf.py writes one)") from None


def _exported(config: VerifyExportConfig, reader: StoreReader, out: str) -> dict:
    """Export the vectors to a GGUF file in ``out`` exactly as ``steerstore export`` does."""
    summary = export.main(export.ExportConfig(
        store=config.store, user=config.user, method=config.method, source=config.source, format="gguf",
        out=out, version=reader.version, storage=config.storage))
    if not summary["files"]:
        raise ValueError(summary.get("nothing_done", "nothing was exported"))
    return summary["files"][0]


def _store_vectors(reader: StoreReader, config: VerifyExportConfig, source: str) -> UserVectors:
    if config.method == "population":
        found = reader.population()
        if found is None:
            raise ValueError(f"store version {reader.version} has no population vector")
        return found
    found = export.found_vectors(reader, config.method, [config.user], source)
    if config.user not in found:
        raise ValueError(reader.why_missing(config.user, export.describe(config.method, source)))
    return found[config.user]


def main(config: VerifyExportConfig) -> dict:
    reader = StoreReader(config.store, config.storage, config.version)
    source = config.source or reader.default_source(FAMILY_OF[config.method])
    runtime = load_runtime_for(reader)
    model_gguf = _model_gguf(reader, config)
    vectors = _store_vectors(reader, config, source)
    ids = runtime.prompt_ids(config.prompts)
    stop = list(runtime.eos_token_ids)
    engine = LlamaCpp(model_gguf, n_ctx=max(len(x) for x in ids) + config.new_tokens + 8)
    if (engine.n_embd, engine.n_layer) != (runtime.hidden_size, runtime.num_layers):
        raise ValueError(f"{model_gguf} is not the store's model: llama.cpp reads n_embd {engine.n_embd}, "
                         f"{engine.n_layer} layers; the store's model has {runtime.hidden_size}, {runtime.num_layers}")
    with tempfile.TemporaryDirectory(prefix="steerstore-verify-") as tmp:
        exported = _exported(config, reader, tmp)
        path = exported["files"][0]
        s0 = float(exported["scale"] if config.scale is None else config.scale)
        layers = engine.set_control_vector(path, s0)
        if layers != sorted(exported["layers"]):
            raise ValueError(f"llama.cpp read layers {layers} from {path}; the export wrote {exported['layers']}")
        # what llama.cpp applies at each layer against the store's vector there (catches a mislabelled layer)
        file_error = max(float(np.abs(engine.rows[l - 1] - s0 * v).max() / max(np.abs(s0 * v).max(), 1e-12))
                         for l, v in vectors.at(layers).items())
        hf = _HF(runtime, vectors.at(layers))
        rows = [{"prompt": p, "prompt_tokens": len(x)} for p, x in zip(config.prompts, ids)]
        at_s0 = {}  # HF's next-token logits steered at s₀ (the greedy path's first step)
        # at s₀: HF's steered greedy path, llama.cpp fed the same tokens, and llama.cpp running free
        for row, x in zip(rows, ids):
            tokens, logits = hf.greedy(x, config.new_tokens, s0)
            at_s0[row["prompt"]] = logits[0]
            choices = engine.choices(x, tokens)
            free = engine.greedy(x, config.new_tokens, stop)
            row["steered_same"], row["steered_ties"] = _steps_agree(tokens, logits, choices, config.agree_tokens,
                                                                    config.tie_margin)
            row["steps_compared"] = min(config.agree_tokens, len(tokens))
            row["steered_agree"] = row["steered_same"] + row["steered_ties"] >= row["steps_compared"]
            row["steered_free_prefix"] = _prefix(tokens, free)
            row["hf_steered"] = runtime.tokenizer.decode(tokens)
            row["llama_cpp_steered"] = runtime.tokenizer.decode(free)
        # unsteered: the engines' noise ν and their plain greedy agreement
        engine.clear_control_vector()
        plain = {}
        for row, x in zip(rows, ids):
            tokens, logits = hf.greedy(x, config.new_tokens, 0.0)
            hf_plain, cpp_plain = logits[0], engine.next_logits(x)
            plain[row["prompt"]] = (hf_plain, cpp_plain)
            row["noise"] = float(np.linalg.norm(_centred(cpp_plain) - _centred(hf_plain)))
            same, ties = _steps_agree(tokens, logits, engine.choices(x, tokens), config.agree_tokens,
                                      config.tie_margin)
            row["unsteered_agree"] = same + ties >= min(config.agree_tokens, len(tokens))
        # the logit shift at the least scale s₀·2^k where HF's shift stands min_signal × ν above the noise
        scale = s0
        for k in range(DOUBLINGS + 1):
            scale = s0 * 2 ** k
            hf_shift = {r["prompt"]: _centred(at_s0[r["prompt"]] if k == 0 else hf.next_logits(x, scale))
                        - _centred(plain[r["prompt"]][0]) for r, x in zip(rows, ids)}
            signal = min(float(np.linalg.norm(hf_shift[r["prompt"]])) / max(r["noise"], 1e-9) for r in rows)
            if signal >= config.min_signal:
                break
        engine.set_control_vector(path, scale)
        for row, x in zip(rows, ids):
            cpp_shift = _centred(engine.next_logits(x)) - _centred(plain[row["prompt"]][1])
            row["shift_cosine"] = _cosine(hf_shift[row["prompt"]], cpp_shift)
            row["shift_norm_hf"] = float(np.linalg.norm(hf_shift[row["prompt"]]))
            row["shift_norm_llama_cpp"] = float(np.linalg.norm(cpp_shift))
    return _report(config, reader, vectors, layers, s0, scale, signal, file_error, str(model_gguf), rows)


def _report(config: VerifyExportConfig, reader: StoreReader, vectors: UserVectors, layers: list[int], s0: float,
            scale: float, signal: float, file_error: float, model_gguf: str, rows: list[dict]) -> dict:
    for r in rows:
        print(f"{r['prompt']!r}: logit-shift cosine {r['shift_cosine']:.4f} at scale {scale:g} (|shift| HF "
              f"{r['shift_norm_hf']:.1f}, llama.cpp {r['shift_norm_llama_cpp']:.1f}; noise {r['noise']:.1f}) · at "
              f"scale {s0:g}, of HF's first {r['steps_compared']} greedy steps llama.cpp takes HF's token at "
              f"{r['steered_same']}, a near tie at {r['steered_ties']} · HF {r['hf_steered']!r} · llama.cpp "
              f"{r['llama_cpp_steered']!r}")
    cosines = [r["shift_cosine"] for r in rows]
    min_cos = min(cosines) if all(math.isfinite(c) for c in cosines) else float("nan")
    agree = sum(r["steered_agree"] for r in rows)
    plain_agree = sum(r["unsteered_agree"] for r in rows)
    short = []
    if not file_error <= 1e-5:
        short.append(f"the exported file does not hold the store's vectors at layers {layers} "
                     f"(largest relative difference {file_error:.2e})")
    if signal < config.min_signal:
        short.append(f"the vector barely moves HF's logits: at scale {scale:g} its shift is {signal:.1f}× the "
                     f"engines' noise (< {config.min_signal:g}×)")
    if not min_cos >= config.min_cosine:  # NaN (no shift at all) fails too
        short.append(f"logit-shift cosine {min_cos:.4f} < {config.min_cosine:g}")
    if agree < len(rows):
        short.append(f"llama.cpp leaves HF's steered greedy path (by more than a near tie) within the first "
                     f"{config.agree_tokens} tokens on {len(rows) - agree} of {len(rows)} prompts")
    who = vectors.user_id or "population"
    line = (f"llama.cpp vs HF · {config.method} · {who} · store {reader.version} · layers {layers} · logit-shift "
            f"cosine at scale {scale:g} min {min_cos:.4f} mean {float(np.mean(cosines)):.4f} · greedy at scale "
            f"{s0:g}: first {config.agree_tokens} tokens agree on {agree}/{len(rows)} prompts (unsteered "
            f"{plain_agree}/{len(rows)}) · " + ("OK" if not short else "FAILED: " + "; ".join(short)))
    summary = {"engine": config.engine, "store": config.store, "version": reader.version, "method": config.method,
               "user_id": vectors.user_id, "layers": layers, "scale": s0, "cosine_scale": scale,
               "signal": signal, "file_error": file_error, "model_gguf": model_gguf, "positions_fitted": vectors.positions,
               "min_cosine": config.min_cosine, "min_signal": config.min_signal, "agree_tokens": config.agree_tokens,
               "tie_margin": config.tie_margin, "new_tokens": config.new_tokens, "shift_cosine_min": min_cos,
               "shift_cosine_mean": float(np.mean(cosines)), "steered_agree": agree, "unsteered_agree": plain_agree,
               "prompts": rows, "ok": not short}
    if config.json:
        write_text(config.json, json.dumps(summary, indent=2) + "\n", config.storage)
    print(line)
    if short:
        summary["failed"] = line
    return summary
