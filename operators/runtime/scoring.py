"""Forward passes that capture activations or score responses (log-probabilities, NLL)."""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Literal, Sequence

import torch

from .hooks import Head, Steering, check_heads, check_layers
from .text import Encoded

if TYPE_CHECKING:
    from . import ModelRuntime

Position = Literal["mean", "last"]


class _StopForward(Exception):
    """Raised by a capture hook after the last layer needed, to skip the rest of the model."""


def forward(rt: ModelRuntime, input_ids, attention_mask, position_ids, past_key_values=None,
            logits_to_keep: int = 0, base_only: bool = False):
    """One forward pass; records the positions so steering hooks can see them."""
    rt._position_ids = position_ids
    try:
        target = rt.model.base_model if base_only else rt.model
        kwargs = {} if base_only else {"logits_to_keep": logits_to_keep}
        return target(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=past_key_values, use_cache=past_key_values is not None, **kwargs)
    finally:
        rt._position_ids = None


@torch.inference_mode()
def activations(rt: ModelRuntime, prompts: Sequence[str], responses: Sequence[str], layers: Sequence[int],
                position: Position = "mean",
                padding_side: Literal["left", "right"] = "right") -> torch.Tensor:
    """Block-output activations over each response: float32 (rows, len(layers), hidden) on CPU.

    ``mean`` averages over the response tokens, ``last`` takes the last response token.
    Forward passes stop after the deepest requested layer (no later blocks, no LM head).
    """
    layers = check_layers(rt, layers)
    encoded = encode_responses(rt, prompts, responses, "nothing to capture")
    out = torch.empty((len(encoded), len(layers), rt.hidden_size), dtype=torch.float32)
    for batch in rt.micro_batches([len(e.ids) for e in encoded]):
        ids, mask, pos = rt.collate([encoded[i].ids for i in batch], padding_side)
        starts = torch.as_tensor([encoded[i].prompt_len for i in batch], device=rt.device)
        try:
            with capturing(rt, layers, response_weights(pos, mask, starts, position), stop=True) as captured:
                rt.forward(ids, mask, pos, base_only=True)
        except _StopForward:
            pass
        for j, l in enumerate(layers):
            out[batch, j] = captured[l].cpu()
    return out


def response_weights(pos: torch.Tensor, mask: torch.Tensor, starts: torch.Tensor,
                     position: Position | None) -> torch.Tensor | None:
    """(batch, seq) pooling weights over each row's response tokens (positions >= its prompt length among real
    tokens): ``mean`` spreads 1 over them, ``last`` puts it on the last real token; None: no capture."""
    if position is None:
        return None
    resp = (pos >= starts[:, None]) & mask.bool()
    if position == "last":
        last = pos.masked_fill(~mask.bool(), -1).argmax(-1)  # column of each row's last real token
        resp = torch.zeros_like(resp)
        resp[torch.arange(len(pos)), last] = True
    return resp.float() / resp.sum(-1, keepdim=True).float()


@contextlib.contextmanager
def capturing(rt: ModelRuntime, layers: Sequence[int], weights: torch.Tensor | None, stop: bool = False):
    """Hooks that pool each block output of ``layers`` with ``weights`` (batch, seq) into (batch, hidden), detached,
    into the yielded dict; ``stop``: the forward pass ends after the deepest of them (``_StopForward``). None
    weights: nothing captured."""
    captured: dict[int, torch.Tensor] = {}
    if weights is None:
        yield captured
        return
    deepest = max(layers)

    def hook(layer_index):
        def fn(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            # (batch, seq, hidden) x (batch, seq) -> (batch, hidden)
            captured[layer_index] = torch.einsum("bsh,bs->bh", hidden.detach().float(), weights)
            if stop and layer_index == deepest:
                raise _StopForward
        return fn

    handles = [rt.layers[l].register_forward_hook(hook(l)) for l in set(layers)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def encode_responses(rt: ModelRuntime, prompts: Sequence[str], responses: Sequence[str], why: str) -> list[Encoded]:
    """``rt.encode``, refusing rows whose response has no token (``why``: what that row could not give)."""
    encoded = rt.encode(prompts, responses)
    empty = [i for i, e in enumerate(encoded) if len(e.ids) == e.prompt_len]
    if empty:
        raise ValueError(f"rows {empty[:5]} have an empty response: {why}")
    return encoded


@torch.inference_mode()
def response_logprobs(rt: ModelRuntime, prompts: Sequence[str], responses: Sequence[str],
                      steer: Steering | None = None, min_shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(response token | prefix) per row, and the response token counts.

    Float32 (rows,) on CPU. The LM head runs only on the positions that predict response
    tokens (not the whole vocabulary at every position). With ``steer``, row i is steered by
    row i of ``steer`` at its configured positions. With ``min_shared`` > 0, rows that share a
    token prefix of at least that many tokens before their last prompt token (e.g. one prompt
    scored under many steering candidates) run it once, unsteered: a row steered from its
    response on leaves it alone; a row steered at every position never shares.
    """
    if steer is not None and steer.rows != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but steering for {steer.rows} rows")
    encoded = rt.encode(prompts, responses)
    counts = torch.as_tensor([len(e.ids) - e.prompt_len for e in encoded], dtype=torch.long)
    if min_shared > 0:  # token_logprobs' shared-prefix path, summed per row
        per_token = token_logprobs(rt, encoded, min_shared, steer)
        return torch.stack([t.sum() for t in per_token]).float(), counts
    totals = torch.zeros(len(encoded), dtype=torch.float32)
    for batch in rt.micro_batches([len(e.ids) for e in encoded]):
        ids, mask, pos = rt.collate([encoded[i].ids for i in batch], "right")
        starts = torch.as_tensor([encoded[i].prompt_len for i in batch])
        ctx = rt.steering(steer.select(batch), starts - 1) if steer is not None else contextlib.nullcontext()
        with ctx:
            hidden = rt.forward(ids, mask, pos, base_only=True).last_hidden_state  # (b, seq, hidden)
        nll = response_nll(rt, hidden, ids, [encoded[i] for i in batch])
        totals[batch] = -nll.float().cpu()
    return totals, counts


def token_nll(rt: ModelRuntime, hidden: torch.Tensor, ids: torch.Tensor, encoded: Sequence[Encoded],
              chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """−log p of every response token from final hidden states (b, seq, hidden): (row index, nll), flat.

    Tokens are in row order, then position order. The LM head runs only on positions that
    predict response tokens, in chunks that bound the (tokens × vocabulary) logits.
    Differentiable; float32 on the model's device.
    """
    r, c = _predicting_positions(encoded, hidden.device)
    if not len(r):
        return r, torch.zeros(0, dtype=torch.float32, device=hidden.device)
    tgt = ids[r, c + 1]
    chunk = chunk_tokens or max(256, 2 ** 26 // max(1, rt.model.get_output_embeddings().weight.shape[0]))
    parts = []
    for lo in range(0, len(r), chunk):
        logits = lm_logits(rt, hidden[r[lo:lo + chunk], c[lo:lo + chunk]])
        parts.append(torch.logsumexp(logits, -1) - logits.gather(-1, tgt[lo:lo + chunk, None]).squeeze(-1))
    return r, torch.cat(parts)


def lm_logits(rt: ModelRuntime, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 next-token logits of final hidden states (..., hidden), as the model's own head gives them."""
    logits = rt.model.get_output_embeddings()(hidden).float()
    scaling = getattr(rt.model.config, "logits_scaling", None)  # Granite divides its logits by this
    if scaling:
        logits = logits / scaling
    cap = getattr(rt.model.config, "final_logit_softcapping", None)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    return logits


@torch.inference_mode()
def influence_logprobs(rt: ModelRuntime, prompts: Sequence[str], context_prompts: Sequence[str],
                       responses: Sequence[str], lams: Sequence[float],
                       temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced Σ log p_λ(response token | prefix) under influence decoding, per λ and row.

    p_λ ∝ exp((1 + λ)·lp_S − λ·lp_∅), with lp_S = log_softmax(ℓ/T) of row i's prompt WITH its
    context (``context_prompts[i]``) and lp_∅ that of the plain prompt (``prompts[i]``): the
    distribution ``Influence`` decodes from, without a plausibility floor. λ = −1 gives the plain
    prompt's likelihood, λ = 0 the with-context prompt's. Returns float32 (len(lams), rows) on CPU
    and the response token counts (rows,).
    """
    if not (len(prompts) == len(context_prompts) == len(responses)):
        raise ValueError(f"{len(prompts)} prompts, {len(context_prompts)} context prompts, {len(responses)} responses")
    plain, ctx = rt.encode(prompts, responses), rt.encode(context_prompts, responses)
    lam = [float(x) for x in lams]
    out = torch.zeros((len(lam), len(plain)), dtype=torch.float32)
    counts = torch.as_tensor([len(e.ids) - e.prompt_len for e in plain], dtype=torch.long)
    for i, (p, c) in enumerate(zip(plain, ctx)):  # one row at a time: its (tokens × vocabulary) logits, twice
        if counts[i] == 0:
            continue
        lp0, lp = (torch.log_softmax(_response_logits(rt, e) / temperature, -1) for e in (p, c))
        target = torch.as_tensor(p.ids[p.prompt_len:], dtype=torch.long, device=lp.device)
        for k in range(len(lam)):  # (tokens, vocabulary) at a time
            score = torch.log_softmax((1 + lam[k]) * lp - lam[k] * lp0, -1)
            out[k, i] = score.gather(-1, target[:, None]).sum().cpu()
    return out, counts


# the (tokens × vocabulary) float32 elements one chunk of contrast scoring holds per tensor
# (full and masked log-probabilities, one γ's score): a few of them are alive at once
CONTRAST_CHUNK_ELEMENTS = 2 ** 25


@torch.inference_mode()
def contrast_logprobs(rt: ModelRuntime, prompts: Sequence[str], responses: Sequence[str],
                      heads: Sequence[Sequence[Head]], gammas: Sequence[float],
                      adaptive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced Σ log p_γ(response token | prefix) under DPS head-contrast decoding, per γ and row.

    p_γ = softmax((1+γ_t)·ℓ_full − γ_t·ℓ_masked) with ℓ = log_softmax(logits); γ_t = γ, or with
    ``adaptive`` γ·H(p_full)/log|V| per token (as ``decoding.contrast_score`` does), no plausibility
    floor (so every real token has finite probability). The masked branch is the same model with
    row i's ``heads[i]`` ablated from the last prompt token on (what decoding's default
    prefill='shared' computes: prompt positions before it unablated). γ = 0 gives the plain
    log-likelihood. A row with no heads (empty or None) scores plainly for every γ. Returns
    float32 (len(gammas), rows) on CPU and the response token counts (rows,).

    Per micro-batch: one forward of every row, one of the rows with heads (gated from their last
    prompt token on); the LM head runs only on the positions that predict response tokens, in
    chunks that bound the (tokens × vocabulary) logits.
    """
    if not (len(prompts) == len(responses) == len(heads)):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and {len(heads)} head sets: "
                         "one of each per row")
    head_sets: list[list[Head]] = []
    for i, row in enumerate(heads):
        try:
            head_sets.append([] if row is None else [(int(l), int(h)) for l, h in row])
        except (TypeError, ValueError):
            raise ValueError(f"heads[{i}] must be (layer, head) pairs; got {row!r}") from None
        check_heads(rt, head_sets[-1])
    try:
        gamma = [float(g) for g in gammas]
    except (TypeError, ValueError):
        raise ValueError(f"gammas must be numbers; got {gammas!r}") from None
    if not all(math.isfinite(g) for g in gamma):
        raise ValueError(f"gammas must be finite; got {gamma}")
    encoded = rt.encode(prompts, responses)
    out = torch.zeros((len(gamma), len(encoded)), dtype=torch.float32)
    counts = torch.as_tensor([len(e.ids) - e.prompt_len for e in encoded], dtype=torch.long)
    if not gamma:
        return out, counts
    gates = rt.head_gates(head_sets)  # (rows, layers, heads)
    ablated = (gates != 1).flatten(1).any(1)  # (rows,) rows with a masked branch
    ablated_dev = ablated.to(rt.device)
    gamma_t = torch.as_tensor(gamma, dtype=torch.float32, device=rt.device)[:, None]  # (γ, 1)
    for batch in rt.micro_batches([len(e.ids) for e in encoded]):
        batch_dev = torch.as_tensor(batch, dtype=torch.long, device=rt.device)
        ids, mask, pos = rt.collate([encoded[i].ids for i in batch], "right")
        rows = [encoded[i] for i in batch]
        full = rt.forward(ids, mask, pos, base_only=True).last_hidden_state  # (b, seq, hidden)
        masked = full
        con = [j for j, i in enumerate(batch) if ablated[i]]
        if con:
            sub = torch.as_tensor(con, dtype=torch.long, device=rt.device)
            starts = torch.as_tensor([encoded[batch[j]].prompt_len - 1 for j in con])
            with rt.head_gating(gates[[batch[j] for j in con]], start=starts):
                hidden = rt.forward(ids[sub], mask[sub], pos[sub], base_only=True).last_hidden_state
            masked = full.clone()
            masked[sub] = hidden
        r, c = _predicting_positions(rows, rt.device)
        if not len(r):
            continue
        target = ids[r, c + 1]
        vocab = rt.model.get_output_embeddings().weight.shape[0]
        chunk = max(1, CONTRAST_CHUNK_ELEMENTS // max(1, vocab))
        scores = torch.zeros((len(gamma), len(r)), dtype=torch.float32, device=rt.device)
        for lo in range(0, len(r), chunk):
            rr, cc, tgt = r[lo:lo + chunk], c[lo:lo + chunk], target[lo:lo + chunk, None]
            lf = torch.log_softmax(lm_logits(rt, full[rr, cc]), -1)  # (tokens, vocab)
            lm = torch.log_softmax(lm_logits(rt, masked[rr, cc]), -1) if con else lf
            scale = torch.special.entr(lf.exp()).sum(-1) / math.log(lf.shape[-1]) if adaptive else None
            plain = ~ablated_dev[batch_dev[rr]]  # (tokens,) rows without heads: γ_t = 0, exactly plain
            for k in range(len(gamma)):
                g = gamma_t[k] if scale is None else gamma_t[k] * scale  # (1,) or (tokens,)
                g = g.expand(len(rr)).masked_fill(plain, 0.0)
                score = (1 + g)[:, None] * lf - g[:, None] * lm
                scores[k, lo:lo + len(rr)] = (score.gather(-1, tgt) - torch.logsumexp(score, -1, keepdim=True))[:, 0]
        totals = torch.zeros((len(gamma), len(batch)), dtype=torch.float32, device=rt.device)
        out[:, batch] = totals.index_add(1, r, scores).cpu()
    return out, counts


def _predicting_positions(encoded: Sequence[Encoded], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every position that predicts a response token, in row then position order."""
    rows, cols = [], []
    for row, e in enumerate(encoded):
        for start, end in e.spans:
            rows += [row] * (end - start)
            cols += range(start - 1, end - 1)  # position t predicts token t + 1
    return (torch.as_tensor(rows, dtype=torch.long, device=device),
            torch.as_tensor(cols, dtype=torch.long, device=device))


def _response_logits(rt: ModelRuntime, e: Encoded) -> torch.Tensor:
    """Float32 (response tokens, vocabulary): the logits that predict each response token of one sequence."""
    ids, mask, pos = rt.collate([e.ids], "right")
    hidden = rt.forward(ids, mask, pos, base_only=True).last_hidden_state[0]
    return lm_logits(rt, hidden[e.prompt_len - 1:len(e.ids) - 1])


def response_nll(rt: ModelRuntime, hidden: torch.Tensor, ids: torch.Tensor,
                 encoded: Sequence[Encoded]) -> torch.Tensor:
    """Sum of −log p(response token) per row (float32 (rows,), differentiable)."""
    rows, nll = token_nll(rt, hidden, ids, encoded)
    out = torch.zeros(len(encoded), dtype=torch.float32, device=hidden.device)
    return out.index_add(0, rows, nll)


def prefix_groups(encoded: Sequence[Encoded], min_shared: int) -> list[tuple[int, list[int]]]:
    """Sequences grouped by a common token prefix: (shared prefix length, indices) per group.

    The prefix always ends before a sequence's last prompt token, so every position that
    predicts a response token lies after it. Sequences are sorted by their tokens (a shared
    prefix makes them neighbours); a sequence joins the current group while the tokens the
    group saves (members − 1) × prefix do not shrink and the prefix keeps ``min_shared`` tokens.
    Groups of one, or with a shorter prefix, come back with prefix 0.
    """
    order = sorted(range(len(encoded)), key=lambda i: encoded[i].ids)
    groups: list[tuple[int, list[int]]] = []

    def limit(i: int) -> int:
        return encoded[i].prompt_len - 1

    def common(a: list[int], b: list[int], n: int) -> int:
        k = 0
        while k < n and a[k] == b[k]:
            k += 1
        return k

    for i in order:
        if groups:
            shared, members = groups[-1]
            first = encoded[members[0]].ids
            new = common(first, encoded[i].ids, min(shared, limit(i)))
            if new >= min_shared and len(members) * new >= (len(members) - 1) * shared:
                groups[-1] = (new, members + [i])
                continue
        groups.append((limit(i), [i]))
    return [(shared if len(members) > 1 and shared >= min_shared else 0, members) for shared, members in groups]


@torch.inference_mode()
def token_logprobs(rt: ModelRuntime, encoded: Sequence[Encoded], min_shared: int = 64,
                   steer: Steering | None = None) -> list[torch.Tensor]:
    """log p of each response token given everything before it: float32 (response len,) per sequence, on CPU.

    Sequences that share a token prefix of at least ``min_shared`` tokens (e.g. the same context
    items before different inputs) run it once: its keys and values are computed in one pass and
    every member's remaining tokens attend to them (``min_shared=0`` disables this). Equal to
    running each sequence whole, up to floating-point rounding. With ``steer``, row i is steered by
    its row of ``steer``: the shared prefix runs unsteered, which a row steered from its response on
    (its last prompt token, after the prefix) never sees; a row steered at every position never shares.
    """
    out: list[torch.Tensor] = [torch.zeros(0)] * len(encoded)
    everywhere = [False] * len(encoded) if steer is None else steer.from_all_positions().tolist()
    shareable = [i for i in range(len(encoded)) if not everywhere[i]]
    groups = [(0, [i for i in range(len(encoded)) if everywhere[i]])]
    if min_shared > 0 and _can_share(rt):
        groups += [(shared, [shareable[j] for j in members])
                   for shared, members in prefix_groups([encoded[i] for i in shareable], min_shared)]
    else:
        groups.append((0, shareable))
    plain = [i for shared, members in groups if not shared for i in members]
    for batch in rt.micro_batches([len(encoded[i].ids) for i in plain]):
        _score_rows(rt, [plain[j] for j in batch], encoded, out, None, 0, steer)
    for shared, members in groups:
        if not shared:
            continue
        prefix = encoded[members[0]].ids[:shared]
        cache = _prefix_cache(rt, prefix)
        lengths = [len(encoded[i].ids) for i in members]  # the prefix is attended by every row
        for batch in rt.micro_batches(lengths):
            _score_rows(rt, [members[j] for j in batch], encoded, out, cache, shared, steer)
    return out


def _can_share(rt: ModelRuntime) -> bool:
    """Prefix caches are used for models without sliding-window attention (whose cache may drop tokens)."""
    config = rt.model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return all(t == "full_attention" for t in layer_types)
    return not getattr(config, "sliding_window", None) or getattr(config, "use_sliding_window", True) is False


def _prefix_cache(rt: ModelRuntime, prefix: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from transformers import DynamicCache

    ids = torch.as_tensor([prefix], dtype=torch.long, device=rt.device)
    cache = DynamicCache(config=rt.model.config)
    rt.forward(ids, torch.ones_like(ids), torch.arange(len(prefix), device=rt.device)[None],
               past_key_values=cache, base_only=True)
    return [(layer.keys, layer.values) for layer in cache.layers]


def _score_rows(rt: ModelRuntime, rows: list[int], encoded: Sequence[Encoded], out: list, prefix_kv, shared: int,
                steer: Steering | None = None) -> None:
    """Score ``rows`` (their tokens after the first ``shared``, behind ``prefix_kv``) into ``out``; with ``steer``,
    row i steered by its row of ``steer`` (positions are real ones, so a response-only row starts after the
    prefix)."""
    from transformers import DynamicCache

    tails = [Encoded(encoded[i].ids[shared:], encoded[i].prompt_len - shared) for i in rows]
    ids, mask, pos = rt.collate([t.ids for t in tails], "right")
    cache = None
    if shared:
        cache = DynamicCache(config=rt.model.config)
        for layer, (k, v) in enumerate(prefix_kv):
            cache.update(k.expand(len(rows), *k.shape[1:]), v.expand(len(rows), *v.shape[1:]), layer)
        mask = torch.cat([mask.new_ones((len(rows), shared)), mask], dim=1)
        pos = pos + shared
    ctx = contextlib.nullcontext() if steer is None else rt.steering(
        steer.select(rows), torch.as_tensor([encoded[i].prompt_len - 1 for i in rows]))
    with ctx:
        hidden = rt.forward(ids, mask, pos, past_key_values=cache, base_only=True).last_hidden_state
    _, nll = token_nll(rt, hidden, ids, tails)
    values = (-nll).cpu()
    start = 0
    for i, t in zip(rows, tails):
        n = len(t.ids) - t.prompt_len
        out[i] = values[start:start + n]
        start += n


@torch.inference_mode()
def sequence_nll(rt: ModelRuntime, encoded: Sequence[Encoded], gates: torch.Tensor | None = None,
                 budget: int | None = None) -> torch.Tensor:
    """−log p(response) per sequence (float64 (rows,) on CPU), optionally with per-row head gates.

    The plain path: one forward per micro-batch. ``gates`` is (rows, layers, heads).
    """
    out = torch.zeros(len(encoded), dtype=torch.float64)
    for batch in rt.micro_batches([len(e.ids) for e in encoded], budget=budget):
        ids, mask, pos = rt.collate([encoded[i].ids for i in batch], "right")
        ctx = rt.head_gating(gates[batch]) if gates is not None else contextlib.nullcontext()
        with ctx:
            hidden = rt.forward(ids, mask, pos, base_only=True).last_hidden_state
        out[batch] = response_nll(rt, hidden, ids, [encoded[i] for i in batch]).double().cpu()
    return out
