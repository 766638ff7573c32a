"""The model runtime every operator shares.

One place for: loading a model (the packaged default or any Hugging Face folder/hub id),
recording its id and weights fingerprint, resolving decoder layers per architecture,
tokenising prompt/response pairs, length-bucketed micro-batching, batched activation capture,
residual-stream steering with a different vector per batch row, attention-head gating and
ablation with a different head set per batch row, and decoding: greedy or nucleus-sampled,
plain, steered, head-contrastive or context-influenced (two branches held as one batch).

``ModelRuntime`` is the facade operators use; each concern lives in its own module and takes
the runtime as its first argument: ``loading`` (config, architectures, fingerprint), ``text``
(tokens, micro-batches, collation), ``scoring`` (capture and log-probabilities), ``hooks``
(steering and head gating), ``ablation`` (exact head ablation, attribution), ``controls`` and
``decoding`` (generation).

Layer numbering (the store's contract): layer i is the output of decoder block i, i.e.
Hugging Face ``hidden_states[i + 1]`` and llama.cpp ``direction.i``.

Position contract for steering: ``response`` positions are those whose output predicts a
response token — the last prompt token and every token after it (in generation: the last
prompt token, then every generated token). ``all`` is every non-padding position.

Head contract: head (l, k) is query head k of decoder block l. It is ablated (or gated by g)
by scaling its slice ``[k*head_dim, (k+1)*head_dim)`` of the *input* of the block's attention
output projection ``self_attn.o_proj`` — the projection's output already mixes heads. With
grouped-query attention, query head k reads key/value head ``k // (num_heads // num_kv_heads)``;
ablating a query head leaves the other query heads of its group untouched.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import weakref
from typing import Literal, Sequence

import torch

from steerstore.operators.runtime.sources import canonical_model_id

from . import ablation, decoding, hooks, scoring, text
from .controls import HeadContrast, Influence, Sampling
from .decoding import DecodeBatch
from .hooks import Head, Steering, SteerPositions
from .loading import (
    DECODER_LAYER_PATHS,
    ModelConfig,
    UnsupportedArchitecture,
    decoder_layers,
    load_model,
    weights_fingerprint,
)
from .scoring import Position
from .text import Encoded, TextEncoder

__all__ = [
    "DECODER_LAYER_PATHS", "DecodeBatch", "Encoded", "Head", "HeadContrast", "Influence", "ModelConfig",
    "ModelRuntime", "Position", "Sampling", "SteerPositions", "Steering", "TextEncoder",
    "UnsupportedArchitecture", "decoder_layers", "weights_fingerprint",
]


_SHARED: "weakref.WeakValueDictionary[str, ModelRuntime]" = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()
LOADS = {"count": 0}  # models loaded by this process (the refresh reports it per worker)


class ModelRuntime:
    """A loaded model plus everything operators do with it. Heavy imports happen in the modules."""

    @classmethod
    def shared(cls, config: ModelConfig) -> "ModelRuntime":
        """The process's runtime for ``config``, loading it on first use.

        Every operator of one worker process that asks for the same model gets the same
        runtime, so a long-lived worker loads each model once however many stages it runs.
        Held weakly: the runtime is freed when no operator uses it any more.
        """
        key = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
        with _SHARED_LOCK:
            runtime = _SHARED.get(key)
            if runtime is None:
                runtime = cls(config)
                _SHARED[key] = runtime
            return runtime

    @classmethod
    def share(cls, runtime: "ModelRuntime") -> "ModelRuntime":
        """Make an already built runtime the process's runtime for its config (benchmarks with random weights)."""
        key = json.dumps(dataclasses.asdict(runtime.config), sort_keys=True, default=str)
        with _SHARED_LOCK:
            _SHARED[key] = runtime
        return runtime

    def __init__(self, config: ModelConfig | None = None, model: torch.nn.Module | None = None,
                 tokenizer=None):
        """Load ``config.name_or_path``, or wrap an already built ``model``/``tokenizer`` (tests)."""
        self.config = config or ModelConfig()
        if model is None:
            model, tokenizer = load_model(self.config)
            LOADS["count"] += 1
        if tokenizer is None:
            raise ValueError("ModelRuntime needs a tokenizer with an explicit model")
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.text = TextEncoder(tokenizer, self.config.use_chat_template)
        self.tokenizer = self.text.tokenizer
        self.model_id = canonical_model_id(self.config.name_or_path)
        self.layers = decoder_layers(self.model)
        self.num_layers = len(self.layers)
        self.hidden_size = int(self.model.config.hidden_size)
        self.num_heads = int(self.model.config.num_attention_heads)
        self.num_kv_heads = int(getattr(self.model.config, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(hooks.o_proj(self, 0).in_features) // self.num_heads
        self.device = next(self.model.parameters()).device
        self._fingerprint: str | None = None
        self._position_ids: torch.Tensor | None = None  # (batch, seq) of the forward in flight
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_token_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    # ---- tokenisation and batching (text.py) ------------------------------------------------

    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        return self.text.prompt_ids(prompts)

    def response_ids(self, responses: Sequence[str]) -> list[list[int]]:
        return self.text.response_ids(responses)

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Encoded]:
        return self.text.encode(prompts, responses)

    def encode_conversation(self, turns: Sequence[tuple[str, str]]) -> Encoded:
        return self.text.encode_conversation(turns)

    def micro_batches(self, lengths: Sequence[int], extra: int = 0, budget: int | None = None) -> list[list[int]]:
        """Indices grouped by similar length so each padded batch stays under max_batch_tokens.

        ``extra`` tokens are reserved per row (new tokens during generation); ``budget``
        overrides max_batch_tokens (a sequence longer than it still gets a batch of its own).
        """
        return text.micro_batches(lengths, budget or self.config.max_batch_tokens, extra)

    def collate(self, seqs: Sequence[Sequence[int]], padding_side: Literal["left", "right"] = "right"):
        """Pad to a batch: (input_ids, attention_mask, position_ids), positions 0.. per real token."""
        return text.collate(seqs, self.tokenizer.pad_token_id, self.device, padding_side)

    # ---- forward passes, capture and scoring (scoring.py) ----------------------------------

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None,
                logits_to_keep: int = 0, base_only: bool = False):
        """One forward pass; records the positions so steering hooks can see them."""
        return scoring.forward(self, input_ids, attention_mask, position_ids, past_key_values,
                               logits_to_keep, base_only)

    def activations(self, prompts: Sequence[str], responses: Sequence[str], layers: Sequence[int],
                    position: Position = "mean",
                    padding_side: Literal["left", "right"] = "right") -> torch.Tensor:
        """Block-output activations over each response: float32 (rows, len(layers), hidden) on CPU."""
        return scoring.activations(self, prompts, responses, layers, position, padding_side)

    def response_logprobs(self, prompts: Sequence[str], responses: Sequence[str],
                          steer: Steering | None = None, min_shared: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of log p(response token | prefix) per row, and the response token counts (``min_shared`` > 0:
        token prefixes that rows share before their last prompt token run once, unsteered)."""
        return scoring.response_logprobs(self, prompts, responses, steer, min_shared)

    def influence_logprobs(self, prompts: Sequence[str], context_prompts: Sequence[str], responses: Sequence[str],
                           lams: Sequence[float], temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ log p_λ(response) per λ and row under influence decoding's distribution (teacher-forced)."""
        return scoring.influence_logprobs(self, prompts, context_prompts, responses, lams, temperature)

    def contrast_logprobs(self, prompts: Sequence[str], responses: Sequence[str], heads: Sequence[Sequence[Head]],
                          gammas: Sequence[float], adaptive: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ log p_γ(response) per γ and row under head-contrast decoding's distribution (teacher-forced).

        Row i's masked branch has ``heads[i]`` ablated from its last prompt token on (decoding's
        shared prefill); no plausibility floor; γ = 0 is the plain log-likelihood. Returns float32
        (len(gammas), rows) on CPU and the response token counts (rows,).
        """
        return scoring.contrast_logprobs(self, prompts, responses, heads, gammas, adaptive)

    def token_logprobs(self, encoded: Sequence[Encoded], min_shared: int = 64) -> list[torch.Tensor]:
        """log p of each response token given everything before it: float32 (response len,) per sequence.

        Token prefixes of at least ``min_shared`` tokens that several sequences share run once.
        """
        return scoring.token_logprobs(self, encoded, min_shared)

    def sequence_nll(self, encoded: Sequence[Encoded], gates: torch.Tensor | None = None,
                     budget: int | None = None) -> torch.Tensor:
        """−log p(response) per sequence (float64 (rows,) on CPU), optionally with per-row head gates."""
        return scoring.sequence_nll(self, encoded, gates, budget)

    # ---- hooks: steering and head gating (hooks.py) -----------------------------------------

    def steering(self, steer: Steering, response_start: torch.Tensor | None = None):
        """Context manager: add each row's vector to the block outputs while it is open."""
        return hooks.steering(self, steer, response_start)

    def head_gates(self, head_sets: Sequence[Sequence[Head]]) -> torch.Tensor:
        """Float32 gates (rows, layers, heads): 0 at each row's listed heads, 1 elsewhere."""
        return hooks.head_gates(self, head_sets)

    def head_gating(self, gates: torch.Tensor, start: torch.Tensor | None = None):
        """Context manager: gate every head per row while it is open (``gates`` (rows, layers, heads)).

        ``gates`` may be (rows, seq, layers, heads) (per position); with ``start`` (rows,), row i is
        gated only at positions >= start[i] of each forward run through ``forward``.
        """
        return hooks.head_gating(self, gates, start)

    # ---- head ablation and attribution (ablation.py) ----------------------------------------

    def ablation_nll(self, encoded: Sequence[Encoded], heads: Sequence[Head]) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact single-head ablations, batched: (base (seqs,), ablated (len(heads), seqs)) NLL sums."""
        return ablation.ablation_nll(self, encoded, heads)

    def steering_gradients(self, prompts: Sequence[str], responses: Sequence[str], layers: Sequence[int],
                           capture: Position | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """∂(mean log-probability per response token)/∂(a vector added at each layer from the response on), per row
        (``capture``: and the response activations of the same forward pass, as ``activations`` gives them)."""
        return ablation.steering_gradients(self, prompts, responses, layers, capture)

    def head_attribution(self, encoded: Sequence[Encoded], groups: Sequence[int], n_groups: int) -> torch.Tensor:
        """∂(mean NLL per token of each group's responses)/∂(head gate) at gates = 1: (n_groups, layers, heads)."""
        return ablation.head_attribution(self, encoded, groups, n_groups)

    # ---- decoding (decoding.py) -------------------------------------------------------------

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64, steer: Steering | None = None,
                 contrast: HeadContrast | None = None, influence: Influence | None = None,
                 sampling: Sampling | None = None) -> list[str]:
        """Decode each prompt, batched: greedy or sampled; plain, steered, head-contrast or influence."""
        return decoding.generate(self, prompts, max_new_tokens, steer, contrast, influence, sampling)

    # the step functions of decoding, kept reachable here for their unit tests
    _sample = staticmethod(decoding.sample)
    _influence_score = staticmethod(decoding.influence_score)
    _contrast_score = staticmethod(decoding.contrast_score)
