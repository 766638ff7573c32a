"""Batched decoding: greedy or nucleus-sampled; plain, steered, head-contrastive or context-influenced."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from .controls import HeadContrast, Influence, Sampling
from .hooks import Steering

if TYPE_CHECKING:
    from . import ModelRuntime


@dataclass
class DecodeBatch:
    """One micro-batch's decoding state, built by ``_decode_setup``.

    Forward rows are the b requests' first branches, then the second branches (see
    ``_decode_setup``); ``hooks`` holds the steering/gating hooks to keep open while decoding.
    """

    hooks: contextlib.ExitStack  # installed hooks; closing it removes them
    ids: torch.Tensor  # (forward rows, seq) tokens still to feed
    mask: torch.Tensor  # (forward rows, cached + seq) attention mask
    positions: torch.Tensor  # (forward rows, seq) explicit positions of ``ids``
    feed: torch.Tensor  # (forward rows,) request row each forward row is fed from
    score: Callable[[torch.Tensor], torch.Tensor]  # (forward rows, vocab) logits -> (b, vocab) scores
    logprob_rows: torch.Tensor  # (b,) bool: score is already a temperature-scaled log-probability


@torch.inference_mode()
def generate(rt: ModelRuntime, prompts: Sequence[str], max_new_tokens: int = 64, steer: Steering | None = None,
             contrast: HeadContrast | None = None, influence: Influence | None = None,
             sampling: Sampling | None = None) -> list[str]:
    """Decode each prompt, batched (left padding, explicit positions, a KV cache per micro-batch).

    Greedy by default; ``sampling`` with temperature > 0 samples instead (see ``Sampling``).
    With ``steer``, row i of ``prompts`` is steered by row i of ``steer``. With ``contrast``,
    row i is decoded by differential preference decoding against the model with row i's
    heads ablated; with ``influence``, by combining the prompt with and without row i's
    context (see ``HeadContrast`` and ``Influence``). These two-branch rows add a second
    sequence to the same batch and KV cache; the sampled or argmax token of the combined
    score feeds both. One call may mix modes across rows (a None entry in ``contrast.heads``
    or ``influence.contexts`` leaves a row out of that mode), but a row is decoded by one
    mode at most: steered (non-zero scale), contrast or influence.
    """
    from transformers import DynamicCache

    for name, extra in (("steering", steer), ("contrast", contrast), ("influence", influence)):
        if extra is not None and extra.rows != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {name} for {extra.rows} rows")
    in_contrast = [contrast is not None and contrast.heads[i] is not None for i in range(len(prompts))]
    in_influence = [influence is not None and influence.contexts[i] is not None for i in range(len(prompts))]
    steered = [steer is not None and float(steer.scales[i]) != 0.0 for i in range(len(prompts))]
    both = [i for i in range(len(prompts)) if in_contrast[i] + in_influence[i] + steered[i] > 1]
    if both:
        raise ValueError(f"rows {both[:5]} are in more than one of steering, head contrast and influence; "
                         "a row is decoded by one of them at most")
    if sampling is not None and not isinstance(sampling, Sampling):
        raise ValueError(f"sampling must be a Sampling; got {type(sampling).__name__}")
    prompt_seqs = rt.prompt_ids(prompts)
    context_seqs = rt.prompt_ids(influence.with_context(prompts)) if influence is not None else None
    # micro-batches reserve room for a row's longer branch
    lengths = [len(s) for s in prompt_seqs] if context_seqs is None else \
        [max(len(a), len(c)) for a, c in zip(prompt_seqs, context_seqs)]
    branches = 2 if any(in_contrast) or any(in_influence) else 1
    uniforms = None if sampling is None or sampling.greedy else sampling.uniforms(len(prompts), max_new_tokens)
    results: list[str] = [""] * len(prompts)
    eos = torch.as_tensor(rt.eos_token_ids or [-1], device=rt.device)
    for batch in rt.micro_batches(lengths, extra=max_new_tokens, budget=rt.config.max_batch_tokens // branches):
        b = len(batch)
        cache = DynamicCache(config=rt.model.config)
        setup = _decode_setup(
            rt, batch, prompt_seqs, context_seqs, cache, steer,
            contrast if any(in_contrast[i] for i in batch) else None,
            influence if any(in_influence[i] for i in batch) else None)
        mask, pos = setup.mask, setup.positions
        if uniforms is not None:
            # a score that is already a temperature-scaled log-probability (influence) samples at 1
            temperature = torch.where(setup.logprob_rows, 1.0, sampling.temperature).to(rt.device)
            u = uniforms[batch].to(rt.device)  # (b, max_new_tokens)
        with setup.hooks:
            logits = rt.forward(setup.ids, mask, pos, past_key_values=cache, logits_to_keep=1).logits[:, -1]
            done = torch.zeros(b, dtype=torch.bool, device=rt.device)
            tokens: list[torch.Tensor] = []
            for step in range(max_new_tokens):
                scores = setup.score(logits)  # (b, vocab) from (forward rows, vocab)
                if uniforms is None:
                    nxt = scores.argmax(-1)
                else:
                    nxt = sample(scores, u[:, step], temperature, sampling.top_p)
                nxt = torch.where(done, rt.tokenizer.pad_token_id, nxt)
                tokens.append(nxt)
                done |= torch.isin(nxt, eos)
                if bool(done.all()):
                    break
                nxt = nxt[setup.feed]  # each forward row (second branches too) is fed its request's token
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                pos = pos[:, -1:] + 1
                logits = rt.forward(nxt[:, None], mask, pos, past_key_values=cache, logits_to_keep=1).logits[:, -1]
        generated = torch.stack(tokens, dim=1).cpu() if tokens else torch.empty((b, 0), dtype=torch.long)
        for row, i in enumerate(batch):
            seq = generated[row].tolist()
            cut = next((k for k, t in enumerate(seq) if t in rt.eos_token_ids), len(seq))
            results[i] = rt.tokenizer.decode(seq[:cut], skip_special_tokens=True)
    return results


def _decode_setup(rt: ModelRuntime, batch: list[int], prompt_seqs: list[list[int]],
                  context_seqs: list[list[int]] | None, cache, steer: Steering | None,
                  contrast: HeadContrast | None, influence: Influence | None) -> DecodeBatch:
    """One micro-batch's decoding state (hooks open, inputs, feed map and score function).

    Forward rows are the b requests' first branches (the prompt; with its context for
    influence rows), then the second branches: the plain prompt of each influence row, then
    the prompt of each contrast row (its heads ablated). ``feed`` (forward rows,) maps each
    forward row to its request row; ``score`` maps a step's (forward rows, vocab) logits to
    the (b, vocab) score tokens are picked from; ``logprob_rows`` (b,) marks rows whose score
    is already a temperature-scaled log-probability (influence). With contrast rows and
    ``prefill='shared'``, the prompts but their last token are prefilled here, unablated, and
    each contrast row's cache is copied to its masked branch.
    """
    b = len(batch)
    inf = [r for r, i in enumerate(batch) if influence is not None and influence.contexts[i] is not None]
    con = [r for r, i in enumerate(batch) if contrast is not None and contrast.heads[i] is not None]
    inf_set = set(inf)
    first = [context_seqs[i] if r in inf_set else prompt_seqs[i] for r, i in enumerate(batch)]
    seqs = first + [prompt_seqs[batch[r]] for r in inf] + [prompt_seqs[batch[r]] for r in con]
    feed = torch.as_tensor(list(range(b)) + inf + con, device=rt.device)
    ids, mask, pos = rt.collate(seqs, "left")

    with contextlib.ExitStack() as stack:  # on an error, hooks installed so far are removed
        if steer is not None:
            rows = steer.select(batch)
            extra = len(seqs) - b  # second branches are never steered
            vectors = {l: torch.cat([v, v.new_zeros((extra, v.shape[1]))]) for l, v in rows.vectors.items()}
            positions = rows.positions if isinstance(rows.positions, str) else rows.positions + ["all"] * extra
            fsteer = Steering(vectors, torch.cat([rows.scales, rows.scales.new_zeros(extra)]), positions)
            start = torch.as_tensor([len(s) - 1 for s in seqs])
            stack.enter_context(rt.steering(fsteer, start))
        if con:
            rows = contrast.select([batch[r] for r in con])
            if rows.prefill == "shared" and min(len(s) for s in seqs) >= 2:
                # the prompts but their last token once, unablated; then copy each contrast row's
                # cache to its masked branch and feed every forward row its last token
                n = b + len(inf)
                rt.forward(ids[:n, :-1], mask[:n, :-1], pos[:n, :-1], past_key_values=cache, logits_to_keep=1)
                cache.reorder_cache(torch.cat([torch.arange(n, device=rt.device),
                                               torch.as_tensor(con, device=rt.device)]))
                ids, pos = ids[:, -1:], pos[:, -1:]
            gates = torch.ones((len(seqs), rt.num_layers, rt.num_heads))
            gates[b + len(inf):] = rt.head_gates(rows.heads)
            stack.enter_context(rt.head_gating(gates))
        hooks = stack.pop_all()
    inf_rows = influence.select([batch[r] for r in inf]) if inf else None
    con_rows = contrast.select([batch[r] for r in con]) if con else None
    inf_idx = torch.as_tensor(inf, dtype=torch.long, device=rt.device)
    con_idx = torch.as_tensor(con, dtype=torch.long, device=rt.device)

    def score(logits: torch.Tensor) -> torch.Tensor:
        out = logits[:b].float()
        if inf:
            second = logits[b:b + len(inf)]
            out[inf_idx] = influence_score(torch.cat([logits[inf_idx], second]), inf_rows)
        if con:
            second = logits[b + len(inf):]
            out[con_idx] = contrast_score(torch.cat([logits[con_idx], second]), con_rows)
        return out

    logprob_rows = torch.zeros(b, dtype=torch.bool)
    logprob_rows[inf] = True
    return DecodeBatch(hooks=hooks, ids=ids, mask=mask, positions=pos, feed=feed, score=score,
                       logprob_rows=logprob_rows)


def sample(scores: torch.Tensor, u: torch.Tensor, temperature: float | torch.Tensor, top_p: float) -> torch.Tensor:
    """Sample (b,) tokens from softmax(scores / temperature) within the top-p nucleus, by inverse CDF.

    ``temperature`` is one value or one per row (b,).
    ``u`` (b,) are uniforms in [0, 1), one per row, so a row's token depends only on its own
    scores and uniform. The nucleus is the smallest prefix of tokens (most probable first, ties
    by index) whose mass reaches ``top_p``; it always holds the most probable token, so a tiny
    ``top_p`` is greedy.
    """
    temperature = torch.as_tensor(temperature, dtype=torch.float32, device=scores.device).reshape(-1, 1)
    probs = torch.softmax(scores.float() / temperature, -1)
    ranked, order = probs.sort(dim=-1, descending=True, stable=True)  # (b, vocab)
    cdf = ranked.cumsum(-1)
    if top_p < 1.0:
        ranked = ranked * ((cdf - ranked) < top_p)  # mass before a token below top_p: in the nucleus
        cdf = ranked.cumsum(-1)
    kept = (ranked > 0).sum(-1, keepdim=True).clamp(min=1)
    target = u.to(cdf)[:, None] * cdf[:, -1:]
    k = torch.searchsorted(cdf, target, right=True).clamp(max=kept - 1)  # first token whose cdf passes u
    return order.gather(-1, k).squeeze(-1)


def influence_score(logits: torch.Tensor, influence: Influence) -> torch.Tensor:
    """out = log_softmax(lp + λ·(lp − lp0)) from the (2 × rows, vocab) step logits (with-context rows first).

    Computed as (1 + λ)·lp − λ·lp0, so λ = 0 gives lp and λ = −1 gives lp0 exactly. With a
    plausibility floor β, a row that amplifies its context (λ > 0) gets −inf on the tokens its plain
    prompt gives less than β times its most likely token's probability (λ ≤ 0 rows are left exact).
    """
    b = influence.rows
    lp = torch.log_softmax(logits[:b].float() / influence.temperature, -1)
    lp0 = torch.log_softmax(logits[b:].float() / influence.temperature, -1)
    lam = influence.lam.to(lp.device)[:, None]
    score = torch.log_softmax((1 + lam) * lp - lam * lp0, -1)
    if influence.plausibility > 0:
        plain = torch.log_softmax(logits[b:].float(), -1)
        floor = plain.max(-1, keepdim=True).values + math.log(influence.plausibility)
        active = torch.as_tensor([bool(c and c.strip()) for c in influence.contexts], device=lp.device)[:, None]
        active = active & (lam > 0)
        score = torch.log_softmax(score.masked_fill(active & (plain < floor), float("-inf")), -1)
    return score


def contrast_score(logits: torch.Tensor, contrast: HeadContrast) -> torch.Tensor:
    """ℓ̃ = (1+γ)·ℓ_full − γ·ℓ_masked from the (2 × rows, vocab) step logits; −inf outside the plausible set."""
    b = contrast.rows
    full = torch.log_softmax(logits[:b].float(), -1)
    masked = torch.log_softmax(logits[b:].float(), -1)
    gamma = contrast.gamma.to(full.device)
    if contrast.adaptive:
        entropy = torch.special.entr(full.exp()).sum(-1) / math.log(full.shape[-1])  # 0·log 0 = 0
        gamma = gamma * entropy
    score = (1 + gamma)[:, None] * full - gamma[:, None] * masked
    if contrast.plausibility > 0:
        floor = full.max(-1, keepdim=True).values + math.log(contrast.plausibility)
        score = score.masked_fill(full < floor, float("-inf"))
    return score
