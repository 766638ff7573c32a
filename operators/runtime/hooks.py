"""Forward hooks on the model: residual-stream steering and per-row attention-head gating.

Every hook is installed by a context manager and removed when it closes (also on an error).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Literal, Sequence

import torch

from .loading import UnsupportedArchitecture

if TYPE_CHECKING:
    from . import ModelRuntime

SteerPositions = Literal["response", "all"]
Head = tuple[int, int]  # (layer, query head)


@dataclass
class Steering:
    """Per-row residual-stream additions: row b gets ``scales[b] * vectors[layer][b]``.

    A zero scale (or zero vector) leaves a row unsteered, so one batch can mix users,
    including unsteered ones. ``positions`` is one value for every row or one per row.
    """

    vectors: dict[int, torch.Tensor]  # layer -> (rows, hidden)
    scales: torch.Tensor  # (rows,)
    positions: SteerPositions | list[SteerPositions] = "response"
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.scales = torch.as_tensor(self.scales, dtype=torch.float32).reshape(-1)
        self.rows = int(self.scales.shape[0])
        per_row = [self.positions] * self.rows if isinstance(self.positions, str) else list(self.positions)
        if len(per_row) != self.rows or any(p not in ("response", "all") for p in per_row):
            raise ValueError(f"steering positions must be 'response' or 'all', once or per row ({self.rows} rows); "
                             f"got {self.positions!r}")
        for layer, vec in self.vectors.items():
            if vec.ndim != 2 or vec.shape[0] != self.rows:
                raise ValueError(
                    f"steering vector for layer {layer} has shape {tuple(vec.shape)}; "
                    f"expected ({self.rows}, hidden)")

    def select(self, rows: Sequence[int]) -> "Steering":
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        positions = self.positions if isinstance(self.positions, str) else [self.positions[i] for i in rows]
        return Steering({l: v[idx] for l, v in self.vectors.items()}, self.scales[idx], positions)

    def from_all_positions(self) -> torch.Tensor:
        """(rows,) bool: rows steered at every position (the others from their response on)."""
        if isinstance(self.positions, str):
            return torch.full((self.rows,), self.positions == "all")
        return torch.as_tensor([p == "all" for p in self.positions])


def check_layers(rt: ModelRuntime, layers: Sequence[int]) -> list[int]:
    bad = [l for l in layers if not 0 <= int(l) < rt.num_layers]
    if bad or not layers:
        raise ValueError(f"layers {list(layers)} invalid: this model has layers 0..{rt.num_layers - 1}")
    return [int(l) for l in layers]


def check_heads(rt: ModelRuntime, heads: Sequence[Head]) -> None:
    bad = [h for h in heads if not (0 <= h[0] < rt.num_layers and 0 <= h[1] < rt.num_heads)]
    if bad:
        raise ValueError(f"heads {bad[:5]} invalid: this model has layers 0..{rt.num_layers - 1} and "
                         f"query heads 0..{rt.num_heads - 1}")


def o_proj(rt: ModelRuntime, layer: int) -> torch.nn.Module:
    """The attention output projection of decoder block ``layer`` (heads are gated at its input)."""
    attn = getattr(rt.layers[layer], "self_attn", None)
    proj = getattr(attn, "o_proj", None)
    if proj is None:
        raise UnsupportedArchitecture(
            f"decoder block {layer} of {type(rt.model).__name__} has no self_attn.o_proj: "
            "head gating needs the attention output projection")
    return proj


def head_gates(rt: ModelRuntime, head_sets: Sequence[Sequence[Head]]) -> torch.Tensor:
    """Float32 gates (rows, layers, heads): 0 at each row's listed heads, 1 elsewhere."""
    gates = torch.ones((len(head_sets), rt.num_layers, rt.num_heads), dtype=torch.float32)
    for row, heads in enumerate(head_sets):
        check_heads(rt, heads)
        for layer, head in heads:
            gates[row, layer, head] = 0.0
    return gates


@contextlib.contextmanager
def gating_hooks(rt: ModelRuntime, gate_for: Callable[[int], torch.Tensor | None],
                 layers: Sequence[int]) -> Iterator[None]:
    """Scale each head's slice of o_proj's input by ``gate_for(layer)``.

    The gate is (rows, heads), one per row for every position, or (rows, seq, heads), one per row
    and position of the forward in flight (its seq must be the forward's); None leaves the layer as is.
    """
    def hook(layer_index):
        def fn(_module, args):
            gate = gate_for(layer_index)
            if gate is None:
                return None
            x = args[0]
            b, s, _ = x.shape
            if gate.ndim == 2:
                gate = gate[:, None, :, None]  # the same gate at every position
            elif gate.ndim == 3 and gate.shape[1] == s:
                gate = gate[..., None]
            else:
                raise ValueError(f"head gate for layer {layer_index} has shape {tuple(gate.shape)}; expected "
                                 f"({b}, {rt.num_heads}) or ({b}, {s}, {rt.num_heads})")
            # (b, s, heads·head_dim) -> (b, s, heads, head_dim) to scale whole heads, then back
            x = (x.view(b, s, rt.num_heads, rt.head_dim) * gate.to(x.dtype)).view(b, s, -1)
            return (x, *args[1:])
        return fn

    handles = [o_proj(rt, l).register_forward_pre_hook(hook(l)) for l in sorted(set(layers))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def head_gating(rt: ModelRuntime, gates: torch.Tensor, start: torch.Tensor | None = None) -> Iterator[None]:
    """Gate every head per row while the context is open: ``gates`` is (rows, layers, heads).

    0 ablates a head, 1 keeps it; gates that require grad give head attributions. ``gates`` may
    also be (rows, seq, layers, heads), one per position of every forward (of seq tokens) run
    inside the context. With ``start`` (rows,), row i is gated only at positions >= start[i]
    (0-based real positions of the forward in flight, as ``ModelRuntime.forward`` records them;
    earlier positions run unablated): e.g. from the last prompt token on, as contrast decoding's
    shared prefill gives its masked branch.
    """
    shape = (rt.num_layers, rt.num_heads)
    if gates.ndim not in (3, 4) or tuple(gates.shape[-2:]) != shape:
        raise ValueError(f"gates must be (rows, {shape[0]}, {shape[1]}) or (rows, seq, {shape[0]}, {shape[1]}); "
                         f"got {tuple(gates.shape)}")
    if start is not None and (gates.ndim != 3 or tuple(torch.as_tensor(start).shape) != (gates.shape[0],)):
        raise ValueError(f"start must be one position per row ({gates.shape[0]},) with (rows, layers, heads) gates")
    gates = gates.to(rt.device)
    layers = range(rt.num_layers) if gates.requires_grad else \
        sorted({int(l) for l in (gates != 1).movedim(-2, 0).flatten(1).any(1).nonzero().flatten()})
    if start is not None:
        start = torch.as_tensor(start, device=rt.device)

    def gate_for(l: int) -> torch.Tensor:
        if start is None:
            return gates[..., l, :]  # (rows, heads) or (rows, seq, heads)
        pos = rt._position_ids  # (rows, seq) of the forward in flight
        if pos is None:
            raise RuntimeError("head gating from a start position ran outside ModelRuntime.forward")
        rows = gates[:, l]  # (rows, heads): ablated where pos >= start, 1 before
        return torch.where((pos >= start[:, None])[..., None], rows[:, None, :], rows.new_ones(()))

    with gating_hooks(rt, gate_for, layers):
        yield


@contextlib.contextmanager
def steering(rt: ModelRuntime, steer: Steering, response_start: torch.Tensor | None = None) -> Iterator[None]:
    """Add each row's vector to the block outputs while the context is open.

    Mutates the model (installs forward hooks) only inside the context; hooks are always
    removed. ``response_start`` (rows,) is each row's first steered position for
    ``positions='response'`` (its last prompt token, as a 0-based real position).
    """
    layers = check_layers(rt, list(steer.vectors))
    everywhere = steer.from_all_positions()
    if not bool(everywhere.all()) and response_start is None:
        raise ValueError("positions='response' needs response_start per row")
    scales = steer.scales.to(rt.device)
    vectors = {l: (v.to(rt.device, torch.float32) * scales[:, None]) for l, v in steer.vectors.items()}
    # first steered position per row: 0 for 'all' rows; None when every row is steered everywhere
    start = None if bool(everywhere.all()) else \
        torch.where(everywhere, 0, torch.as_tensor(response_start)).to(rt.device)

    def hook(layer_index):
        def fn(_module, _inputs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            rows = hidden.shape[0]  # a forward of fewer rows (a shared prefill) is the first rows
            add = vectors[layer_index][:rows, None, :]  # (rows, 1, hidden)
            if start is not None:
                # positions come from the forward in flight (ModelRuntime.forward records them)
                pos = rt._position_ids
                if pos is None:
                    raise RuntimeError("steering hook ran outside ModelRuntime.forward")
                add = add * (pos >= start[:rows, None]).unsqueeze(-1)  # (rows, seq, hidden)
            hidden = hidden + add.to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return fn

    handles = [rt.layers[l].register_forward_hook(hook(l)) for l in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
