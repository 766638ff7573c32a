"""Attention-head effects on response NLL: exact forked single-head ablation and gradient attribution."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Collection, Sequence

import torch

from .hooks import Head, Steering, check_heads, check_layers, gating_hooks
from .scoring import Position, capturing, encode_responses, response_nll, response_weights
from .text import Encoded

if TYPE_CHECKING:
    from . import ModelRuntime

# decoder-layer keyword arguments that carry one row per batch row (expanded when rows fork)
_ROW_KWARGS = ("attention_mask", "position_ids", "position_embeddings", "position_embeddings_global",
               "position_embeddings_local")


@torch.inference_mode()
def ablation_nll(rt: ModelRuntime, encoded: Sequence[Encoded],
                 heads: Sequence[Head]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact single-head ablations, batched: (base (seqs,), ablated (len(heads), seqs)) NLL sums.

    ``ablated[i, j]`` is −log p(response j) with head ``heads[i]`` ablated. Variants are batched
    together and *forked* inside the forward pass: ablating a head of block l cannot change
    blocks below l, so a variant's rows are copied from the unablated rows at the input of
    block l rather than computed from the embeddings (about half the work of one full pass
    per head over all 30 blocks). When the variants need several passes (chunks), the first
    keeps the unablated hidden states at each later chunk's first fork block, and the later
    chunks start there: the blocks below run once per micro-batch. Float64 on CPU.
    """
    heads = [(int(l), int(h)) for l, h in heads]
    check_heads(rt, heads)
    base = torch.zeros(len(encoded), dtype=torch.float64)
    ablated = torch.zeros((len(heads), len(encoded)), dtype=torch.float64)
    order = sorted(range(len(heads)), key=lambda i: heads[i])
    budget = rt.config.max_batch_tokens
    # base micro-batches leave room for variant copies of their rows
    for batch in rt.micro_batches([len(e.ids) for e in encoded], budget=max(1, budget // 8)):
        seqs = [encoded[i] for i in batch]
        ids, mask, pos = rt.collate([e.ids for e in seqs], "right")
        per_chunk = max(1, budget // (len(batch) * ids.shape[1]) - 1)
        chunks = [order[i:i + per_chunk] for i in range(0, len(order), per_chunk)] or [[]]
        # the first chunk keeps the unablated rows to the end and leaves their hidden states at each
        # later chunk's first fork block: later chunks start there instead of at the embeddings
        starts = {heads[chunk[0]][0] for chunk in chunks[1:]}
        cache: dict[int, torch.Tensor] = {}
        for n, chunk in enumerate(chunks):
            start = heads[chunk[0]][0] if n else 0
            blocks, nll = _forked_forward(rt, ids, mask, pos, seqs, [heads[i] for i in chunk],
                                          keep_base=(n == 0), capture=starts if n == 0 else (),
                                          cache=cache, start=start)
            for block, variant in enumerate(blocks):
                values = nll[block * len(batch):(block + 1) * len(batch)].double().cpu()
                if variant < 0:
                    base[batch] = values
                else:
                    ablated[chunk[variant], batch] = values
    return base, ablated


class _Skipped(torch.nn.Module):
    """Stands in for a decoder block below the first fork: returns the cached unablated hidden states."""

    def __init__(self, hidden: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.hidden, self.as_tuple = hidden, as_tuple

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


@contextlib.contextmanager
def _start_at(rt: ModelRuntime, start: int, hidden: torch.Tensor | None, as_tuple: bool):
    """While open, blocks ``0 .. start-1`` are not run: block ``start`` receives ``hidden``."""
    if start <= 0 or hidden is None:
        yield
        return
    originals = [rt.layers[i] for i in range(start)]
    stub = _Skipped(hidden, as_tuple)
    try:
        for i in range(start):
            rt.layers[i] = stub
        yield
    finally:
        for i, block in enumerate(originals):
            rt.layers[i] = block


def _forked_forward(rt: ModelRuntime, ids, mask, pos, seqs: Sequence[Encoded], variants: Sequence[Head],
                    keep_base: bool, capture: Collection[int] = (), cache: dict | None = None, start: int = 0):
    """One forward whose batch grows at each variant's block: returns (block layout, NLL per row).

    Rows are blocks of ``B = len(seqs)`` rows; block id −1 is unablated, ``v`` ablates
    ``variants[v]``. Decoder-block pre-hooks copy the unablated block for the variants that start
    at that block (and expand the per-row keyword arguments: masks, positions, rotary tables);
    o_proj pre-hooks ablate each variant's head; the unablated block is dropped once no later
    variant needs it (unless ``keep_base``). The unablated rows' input of each block in
    ``capture`` is stored in ``cache``; with ``start`` > 0 the blocks below ``start`` are not run
    and block ``start`` gets ``cache[start]`` (every variant must be at or above ``start``).
    """
    b = len(seqs)
    cache = {} if cache is None else cache
    starts: dict[int, list[int]] = {}
    for v, (layer, _head) in enumerate(variants):
        starts.setdefault(layer, []).append(v)
    last_fork = max(starts) if starts else -1
    if start and (not starts or min(starts) < start or start not in cache):
        raise ValueError(f"cannot start at block {start}: a variant is below it or its input was not cached")
    state = {"blocks": [-1]}
    gates: dict[int, torch.Tensor] = {}

    def expand(value, index):
        if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[0] == b:
            return value.index_select(0, index)
        if isinstance(value, tuple):
            return tuple(expand(v, index) for v in value)
        return value

    def fork(layer_index):
        def fn(_module, args, kwargs):
            blocks = list(state["blocks"])
            hidden = args[0] if args else kwargs["hidden_states"]
            if layer_index in capture:
                cache[layer_index] = hidden[:b].clone()
            new = starts.get(layer_index, [])
            if new:
                hidden = torch.cat([hidden] + [hidden[:b]] * len(new), dim=0)
                blocks += new
            if layer_index >= last_fork and not keep_base and blocks[0] == -1 and len(blocks) > 1:
                hidden, blocks = hidden[b:], blocks[1:]
            state["blocks"] = blocks
            gate = torch.ones((len(blocks), rt.num_heads), device=hidden.device)
            for j, v in enumerate(blocks):
                if v >= 0 and variants[v][0] == layer_index:
                    gate[j, variants[v][1]] = 0.0
            gates[layer_index] = gate.repeat_interleave(b, dim=0)
            index = torch.arange(b, device=hidden.device).repeat(len(blocks))
            kwargs = {k: (expand(v, index) if k in _ROW_KWARGS else v) for k, v in kwargs.items()}
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}
        return fn

    def output_kind(_module, _args, output):
        cache["as_tuple"] = isinstance(output, tuple)

    handles = [rt.layers[l].register_forward_pre_hook(fork(l), with_kwargs=True)
               for l in range(start, rt.num_layers)]
    if not start:
        handles.append(rt.layers[0].register_forward_hook(output_kind))
    try:
        with gating_hooks(rt, lambda l: gates.get(l), sorted(starts)), \
                _start_at(rt, start, cache.get(start), bool(cache.get("as_tuple"))):
            hidden = rt.forward(ids, mask, pos, base_only=True).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    blocks = state["blocks"]
    rows = [seqs[i % b] for i in range(len(blocks) * b)]
    return blocks, response_nll(rt, hidden, ids.repeat(len(blocks), 1), rows)


def head_attribution(rt: ModelRuntime, encoded: Sequence[Encoded], groups: Sequence[int],
                     n_groups: int) -> torch.Tensor:
    """∂(mean NLL per token of each group's responses)/∂(head gate) at gates = 1.

    One forward and one backward pass per micro-batch (attribution patching). ``groups[i]``
    says which group (e.g. user) sequence i belongs to; the mean is over all response tokens
    of the group. Returns float64 (n_groups, layers, heads) on CPU. A first-order estimate
    of ablating head h is ΔNLL ≈ −gradient.
    """
    tokens = torch.zeros(n_groups, dtype=torch.float64)
    for e, g in zip(encoded, groups):
        tokens[g] += e.scored
    grads = torch.zeros((n_groups, rt.num_layers, rt.num_heads), dtype=torch.float64)
    group_index = torch.as_tensor(list(groups), dtype=torch.long)
    for batch in rt.micro_batches([len(e.ids) for e in encoded], budget=rt.config.max_backward_tokens):
        ids, mask, pos = rt.collate([encoded[i].ids for i in batch], "right")
        gates = torch.ones((len(batch), rt.num_layers, rt.num_heads), device=rt.device, requires_grad=True)
        with torch.enable_grad(), rt.head_gating(gates):
            hidden = rt.forward(ids, mask, pos, base_only=True).last_hidden_state
            nll = response_nll(rt, hidden, ids, [encoded[i] for i in batch])
            weight = 1.0 / tokens[group_index[batch]].clamp(min=1).to(nll)
            (nll * weight).sum().backward()
        grads.index_add_(0, group_index[batch], gates.grad.double().cpu())
    return grads


def steering_gradients(rt: ModelRuntime, prompts: Sequence[str], responses: Sequence[str],
                       layers: Sequence[int], capture: Position | None = None
                       ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """∂(mean log-probability per response token)/∂v at v = 0, per row and layer: float32 (rows, len(layers), hidden).

    v is a vector added to the output of block l from each row's last prompt token on (where a vector applied at
    ``response`` positions is served), one per row and layer, so one forward and one backward pass per micro-batch
    (``model.max_backward_tokens``) give every row's gradient at every layer. The first-order change of a row's
    mean log-probability when steered by α·u at layer l is α·⟨gradient, u⟩.

    With ``capture`` (``mean`` or ``last``), the same forward pass also returns the block-output activations over
    each response, as ``activations(..., position=capture)`` gives them: (gradients, activations), so a caller
    that needs both runs the model once.
    """
    layers = check_layers(rt, layers)
    encoded = encode_responses(rt, prompts, responses, "no log-probability to differentiate")
    out = torch.empty((len(encoded), len(layers), rt.hidden_size), dtype=torch.float32)
    acts = torch.empty_like(out) if capture is not None else None
    for batch in rt.micro_batches([len(e.ids) for e in encoded], budget=rt.config.max_backward_tokens):
        ids, mask, pos = rt.collate([encoded[i].ids for i in batch], "right")
        starts = torch.as_tensor([encoded[i].prompt_len for i in batch])
        vectors = {l: torch.zeros((len(batch), rt.hidden_size), device=rt.device, requires_grad=True) for l in layers}
        steer = Steering(vectors, torch.ones(len(batch)), "response")
        with torch.enable_grad(), rt.steering(steer, starts - 1):
            with capturing(rt, layers, response_weights(pos, mask, starts.to(pos.device), capture)) as captured:
                hidden = rt.forward(ids, mask, pos, base_only=True).last_hidden_state
            nll = response_nll(rt, hidden, ids, [encoded[i] for i in batch])
            counts = torch.as_tensor([len(encoded[i].ids) - encoded[i].prompt_len for i in batch]).to(nll)
            (-(nll / counts)).sum().backward()
        for j, l in enumerate(layers):
            out[batch, j] = vectors[l].grad.float().cpu()
            if acts is not None:
                acts[batch, j] = captured[l].cpu()
    return out if acts is None else (out, acts)
