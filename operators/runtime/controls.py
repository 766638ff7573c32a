"""The per-row decoding controls ``generate`` takes: head contrast, context influence, sampling."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch

from .hooks import Head


@dataclass
class HeadContrast:
    """Differential preference decoding: per step ℓ̃ = (1+γ)·ℓ_full − γ·ℓ_masked.

    ℓ are next-token log-probabilities; the masked branch is the same model with row b's
    ``heads[b]`` ablated. ``adaptive`` scales γ per row and step by the full branch's normalised
    entropy H(p)/log|V| (a confident model is steered less). ``plausibility`` β keeps only
    tokens with p_full ≥ β·max p_full (0 disables). ``prefill='shared'`` computes the prompt once
    with the full model and copies its KV cache to the masked branch (the masked branch differs
    from the last prompt token on); ``separate`` prefills the masked branch with the heads
    ablated too. A row whose ``heads`` entry is None is not contrast-decoded (``generate`` may
    decode it with steering or influence instead).
    """

    heads: list[list[Head] | None]
    gamma: torch.Tensor | float = 1.0
    adaptive: bool = False
    plausibility: float = 0.1
    prefill: Literal["shared", "separate"] = "shared"
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.heads = [None if row is None else [(int(l), int(h)) for l, h in row] for row in self.heads]
        self.rows = len(self.heads)
        gamma = torch.as_tensor(self.gamma, dtype=torch.float32).reshape(-1)
        self.gamma = gamma.expand(self.rows).clone() if gamma.numel() == 1 else gamma
        if self.gamma.shape[0] != self.rows:
            raise ValueError(f"gamma has {self.gamma.shape[0]} values for {self.rows} rows")
        if not 0.0 <= self.plausibility < 1.0:
            raise ValueError("plausibility must be in [0, 1)")
        if self.prefill not in ("shared", "separate"):
            raise ValueError("prefill must be 'shared' or 'separate'")

    def select(self, rows: Sequence[int]) -> "HeadContrast":
        rows = list(rows)
        return HeadContrast([self.heads[i] for i in rows], self.gamma[torch.as_tensor(rows, dtype=torch.long)],
                            self.adaptive, self.plausibility, self.prefill)


@dataclass
class Influence:
    """Influence decoding (context steering): per step out = log_softmax(lp + λ·(lp − lp0)).

    lp = log_softmax(ℓ_S / T) are the next-token log-probabilities of row b's prompt WITH its
    context S (``template`` filled with ``contexts[b]`` and the prompt), lp0 = log_softmax(ℓ_∅ / T)
    those of the plain prompt. Both branches keep their own KV cache and are fed the same chosen
    token. λ = 0 decodes the with-context prompt, λ = −1 the plain prompt, λ > 0 amplifies the
    context's influence and −1 < λ < 0 damps it. ``temperature`` T scales the log-probabilities
    inside the combination (reference: T = 0.6 with sampling top-p 0.9). An empty (or blank)
    context leaves the row's prompt as is: both branches are equal and the row decodes plainly.
    A None context means the row is not influence-decoded (``generate`` may steer it otherwise).
    ``plausibility`` β > 0 keeps the answer on the prompt: a row with a context and λ > 0 may only
    choose tokens the plain prompt finds plausible, p∅(v) ≥ β·max p∅ (untempered), so a strong λ
    cannot make it write about the context instead of answering (0: no floor; λ ≤ 0 rows, e.g. the
    context in the prompt at λ = 0, are decoded exactly as without a floor).
    """

    contexts: list[str | None]
    lam: torch.Tensor | float = 1.0
    temperature: float = 1.0
    template: str = "{context}\n\n{prompt}"
    plausibility: float = 0.0
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.contexts = list(self.contexts)
        if not all(c is None or isinstance(c, str) for c in self.contexts):
            raise ValueError("influence contexts must be strings (one per row; None: not influence-decoded)")
        self.rows = len(self.contexts)
        lam = torch.as_tensor(self.lam, dtype=torch.float32).reshape(-1)
        self.lam = lam.expand(self.rows).clone() if lam.numel() == 1 else lam
        if self.lam.shape[0] != self.rows:
            raise ValueError(f"lam has {self.lam.shape[0]} values for {self.rows} rows")
        if not bool(torch.isfinite(self.lam).all()):
            raise ValueError("lam must be finite")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"influence temperature must be > 0; got {self.temperature}")
        if not 0.0 <= self.plausibility < 1.0:
            raise ValueError(f"influence plausibility must be in [0, 1); got {self.plausibility}")
        for slot in ("{context}", "{prompt}"):
            if slot not in self.template:
                raise ValueError(f"influence template {self.template!r} lacks the {slot} placeholder")

    def select(self, rows: Sequence[int]) -> "Influence":
        rows = list(rows)
        return Influence([self.contexts[i] for i in rows], self.lam[torch.as_tensor(rows, dtype=torch.long)],
                         self.temperature, self.template, self.plausibility)

    def with_context(self, prompts: Sequence[str]) -> list[str]:
        """Each row's prompt with its context: the template filled (the prompt alone if the context is blank)."""
        if len(prompts) != self.rows:
            raise ValueError(f"{len(prompts)} prompts but influence for {self.rows} rows")

        def fill(context: str | None, prompt: str) -> str:
            if context is None or not context.strip():
                return prompt
            slots = {"context": context, "prompt": prompt}
            # one pass, so braces or placeholders inside the context or prompt are left alone
            return re.sub(r"\{(context|prompt)\}", lambda m: slots[m.group(1)], self.template)
        return [fill(c, p) for c, p in zip(self.contexts, prompts)]


@dataclass
class Sampling:
    """How ``generate`` picks tokens: temperature 0 is greedy; > 0 samples the top-p nucleus.

    Sampling draws from softmax(score / temperature) restricted to the smallest set of most
    probable tokens whose mass reaches ``top_p``. Row i of a ``generate`` call uses its own
    random stream seeded from (``seed``, i), so the same call with the same seed gives the same
    text, and a row's output does not depend on how the call is micro-batched (it does depend on
    the row's index in the call). With ``Influence`` the score is already the temperature-scaled
    log-probability ``out``: sampling uses softmax(out) and ``top_p`` only (its temperature just
    switches sampling on; the influence temperature is the one that applies).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"sampling temperature must be >= 0 (0 = greedy); got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling top_p must be in (0, 1]; got {self.top_p}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"sampling seed must be an int; got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def uniforms(self, rows: int, steps: int) -> torch.Tensor:
        """Float64 (rows, steps) uniforms in [0, 1) on CPU: row i's stream depends only on (seed, i)."""
        out = torch.empty((rows, steps), dtype=torch.float64)
        for i in range(rows):
            key = hashlib.sha256(f"steerstore-sampling/{self.seed}/{i}".encode()).digest()
            generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
            out[i] = torch.rand(steps, generator=generator, dtype=torch.float64)
        return out

