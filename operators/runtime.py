"""The model runtime every operator shares.

One place for: loading a model (the packaged default or any Hugging Face folder/hub id),
recording its id and weights fingerprint, resolving decoder layers per architecture,
tokenising prompt/response pairs, length-bucketed micro-batching, batched activation capture,
residual-stream steering with a different vector per batch row, attention-head gating and
ablation with a different head set per batch row, and decoding: greedy or nucleus-sampled,
plain, steered, head-contrastive or context-influenced (two branches held as one batch).

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

import contextlib
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import torch

from infra.config import check, option
from infra.models import DEFAULT_MODEL, canonical_model_id, resolve_model_path

Position = Literal["mean", "last"]
SteerPositions = Literal["response", "all"]
Head = tuple[int, int]  # (layer, query head)
# decoder-layer keyword arguments that carry one row per batch row (expanded when rows fork)
_ROW_KWARGS = ("attention_mask", "position_ids", "position_embeddings", "position_embeddings_global",
               "position_embeddings_local")

# model_type -> attribute path of the ModuleList of decoder blocks. Each block's attention
# output projection is ``<block>.self_attn.o_proj`` in all of these.
DECODER_LAYER_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "mixtral": "model.layers",
    "qwen2": "model.layers",
    "qwen2_moe": "model.layers",
    "qwen3": "model.layers",
    "qwen3_moe": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "gemma3": "model.language_model.layers",
    "phi3": "model.layers",
    "olmo2": "model.layers",
    "granite": "model.layers",
}


@dataclass
class ModelConfig:
    name_or_path: str = option(
        DEFAULT_MODEL,
        help="model to load: 'smollm2-135m-instruct' (packaged default), a local Hugging Face folder or a hub id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="weights/activations dtype; auto = bfloat16 on CUDA, float32 on CPU")
    device: str = option("auto", help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = option(
        "sdpa", help="attention kernel passed to from_pretrained")
    max_batch_tokens: int = option(
        8192, help="padded tokens per forward micro-batch (sequences are length-bucketed to fill it)")
    use_chat_template: bool = option(
        True, help="wrap prompts in the model's chat template when it has one")
    trust_remote_code: bool = option(False, help="allow custom modelling code from the hub")

    def __post_init__(self) -> None:
        check(bool(self.name_or_path), "model.name_or_path must not be empty")
        check(self.max_batch_tokens >= 64, "model.max_batch_tokens must be >= 64")


class UnsupportedArchitecture(ValueError):
    """The model's decoder blocks cannot be located; the message says how to add them."""


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList of decoder blocks of a causal LM, by its ``config.model_type``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    path = DECODER_LAYER_PATHS.get(model_type or "")
    if path is None:
        raise UnsupportedArchitecture(
            f"steerstore does not know where the decoder blocks of model_type={model_type!r} are. "
            f"Supported: {sorted(DECODER_LAYER_PATHS)}. To add it, put the attribute path of its "
            "ModuleList of decoder blocks (e.g. 'model.layers') into DECODER_LAYER_PATHS in "
            "operators/runtime.py; each block must return its hidden states and have "
            "self_attn.o_proj.")
    node = model
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            raise UnsupportedArchitecture(
                f"model_type={model_type!r}: expected decoder blocks at '{path}' but "
                f"'{part}' is missing; fix DECODER_LAYER_PATHS in operators/runtime.py")
    return node  # type: ignore[return-value]


def weights_fingerprint(model: torch.nn.Module, sample: int = 4096) -> str:
    """A cheap fingerprint of a model's weights: names, shapes and a strided sample of values.

    Values are rounded to bfloat16 before hashing, so the same weights loaded in float32 or
    bfloat16 give the same fingerprint, while different weights almost surely do not.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        values = flat[::step][:sample].to(torch.bfloat16).to(torch.float32).cpu().numpy()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(values.tobytes())
    return "sha256:" + digest.hexdigest()[:32]


@dataclass
class Encoded:
    """One tokenised sequence: prompt tokens (templated) followed by response tokens."""

    ids: list[int]
    prompt_len: int


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
    """

    contexts: list[str | None]
    lam: torch.Tensor | float = 1.0
    temperature: float = 1.0
    template: str = "{context}\n\n{prompt}"
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
        for slot in ("{context}", "{prompt}"):
            if slot not in self.template:
                raise ValueError(f"influence template {self.template!r} lacks the {slot} placeholder")

    def select(self, rows: Sequence[int]) -> "Influence":
        rows = list(rows)
        return Influence([self.contexts[i] for i in rows], self.lam[torch.as_tensor(rows, dtype=torch.long)],
                         self.temperature, self.template)

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


class TextEncoder:
    """How text becomes tokens, shared by the runtime and by validation (which needs no weights)."""

    def __init__(self, tokenizer, use_chat_template: bool = True):
        self.tokenizer = tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))

    @classmethod
    def load(cls, config: "ModelConfig") -> "TextEncoder":
        from transformers import AutoTokenizer

        path = resolve_model_path(config.name_or_path)
        return cls(AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code),
                   config.use_chat_template)

    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        """Token ids of each prompt as the model sees it before its answer."""
        if not prompts:
            return []
        if self.templated:
            texts = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in prompts
            ]
            return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]

    def response_ids(self, responses: Sequence[str]) -> list[list[int]]:
        if not responses:
            return []
        return self.tokenizer(list(responses), add_special_tokens=False)["input_ids"]

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Encoded]:
        """Prompt (templated) followed by the raw response tokens, no end-of-turn token."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return [Encoded(p + r, len(p)) for p, r in zip(self.prompt_ids(prompts), self.response_ids(responses))]


class _StopForward(Exception):
    """Raised by a capture hook after the last layer needed, to skip the rest of the model."""


class ModelRuntime:
    """A loaded model plus everything operators do with it. Heavy imports happen here."""

    def __init__(self, config: ModelConfig | None = None, model: torch.nn.Module | None = None,
                 tokenizer=None):
        """Load ``config.name_or_path``, or wrap an already built ``model``/``tokenizer`` (tests)."""
        self.config = config or ModelConfig()
        if model is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = resolve_model_path(self.config.name_or_path)
            device = self._device()
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=self.config.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=self._dtype(device), attn_implementation=self.config.attn_implementation,
                trust_remote_code=self.config.trust_remote_code)
            model.to(device)
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
        self.head_dim = int(self._o_proj(0).in_features) // self.num_heads
        self.device = next(self.model.parameters()).device
        self._fingerprint: str | None = None
        self._position_ids: torch.Tensor | None = None  # (batch, seq) of the forward in flight
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_token_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))

    def _device(self) -> torch.device:
        if self.config.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.config.device)

    def _dtype(self, device: torch.device) -> torch.dtype:
        if self.config.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.config.dtype)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    # ---- tokenisation (delegated to the shared TextEncoder) ------------------------------

    def prompt_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        return self.text.prompt_ids(prompts)

    def response_ids(self, responses: Sequence[str]) -> list[list[int]]:
        return self.text.response_ids(responses)

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Encoded]:
        return self.text.encode(prompts, responses)

    def micro_batches(self, lengths: Sequence[int], extra: int = 0, budget: int | None = None) -> list[list[int]]:
        """Indices grouped by similar length so each padded batch stays under max_batch_tokens.

        ``extra`` tokens are reserved per row (new tokens during generation); ``budget``
        overrides max_batch_tokens (a sequence longer than it still gets a batch of its own).
        """
        budget = budget or self.config.max_batch_tokens
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for i in order:
            size = lengths[i] + extra
            if current and max(longest, size) * (len(current) + 1) > budget:
                batches.append(current)
                current, longest = [], 0
            current.append(i)
            longest = max(longest, size)
        if current:
            batches.append(current)
        return batches

    def collate(self, seqs: Sequence[Sequence[int]], padding_side: Literal["left", "right"] = "right"):
        """Pad to a batch: (input_ids, attention_mask, position_ids), positions 0.. per real token."""
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            if padding_side == "right":
                ids[row, : len(seq)] = torch.as_tensor(seq)
                mask[row, : len(seq)] = 1
            else:
                ids[row, width - len(seq):] = torch.as_tensor(seq)
                mask[row, width - len(seq):] = 1
        # explicit positions make left and right padding give identical results
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    # ---- forward passes -----------------------------------------------------------------

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None,
                logits_to_keep: int = 0, base_only: bool = False):
        """One forward pass; records the positions so steering hooks can see them."""
        self._position_ids = position_ids
        try:
            target = self.model.base_model if base_only else self.model
            kwargs = {} if base_only else {"logits_to_keep": logits_to_keep}
            return target(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, use_cache=past_key_values is not None, **kwargs)
        finally:
            self._position_ids = None

    def _check_layers(self, layers: Sequence[int]) -> list[int]:
        bad = [l for l in layers if not 0 <= int(l) < self.num_layers]
        if bad or not layers:
            raise ValueError(f"layers {list(layers)} invalid: this model has layers 0..{self.num_layers - 1}")
        return [int(l) for l in layers]

    @torch.inference_mode()
    def activations(self, prompts: Sequence[str], responses: Sequence[str], layers: Sequence[int],
                    position: Position = "mean",
                    padding_side: Literal["left", "right"] = "right") -> torch.Tensor:
        """Block-output activations over each response: float32 (rows, len(layers), hidden) on CPU.

        ``mean`` averages over the response tokens, ``last`` takes the last response token.
        Forward passes stop after the deepest requested layer (no later blocks, no LM head).
        """
        layers = self._check_layers(layers)
        encoded = self.encode(prompts, responses)
        empty = [i for i, e in enumerate(encoded) if len(e.ids) == e.prompt_len]
        if empty:
            raise ValueError(f"rows {empty[:5]} have an empty response: nothing to capture")
        out = torch.empty((len(encoded), len(layers), self.hidden_size), dtype=torch.float32)
        deepest = max(layers)
        for batch in self.micro_batches([len(e.ids) for e in encoded]):
            seqs = [encoded[i].ids for i in batch]
            ids, mask, pos = self.collate(seqs, padding_side)
            # response token mask (batch, seq): positions >= prompt_len among real tokens
            starts = torch.as_tensor([encoded[i].prompt_len for i in batch], device=self.device)
            resp = (pos >= starts[:, None]) & mask.bool()
            if position == "last":
                last = pos.masked_fill(~mask.bool(), -1).argmax(-1)  # column of each row's last real token
                resp = torch.zeros_like(resp)
                resp[torch.arange(len(batch)), last] = True
            weights = resp.float() / resp.sum(-1, keepdim=True).float()  # (batch, seq)
            captured: dict[int, torch.Tensor] = {}

            def hook(layer_index):
                def fn(_module, _inputs, output):
                    hidden = output[0] if isinstance(output, tuple) else output
                    # (batch, seq, hidden) x (batch, seq) -> (batch, hidden)
                    captured[layer_index] = torch.einsum("bsh,bs->bh", hidden.float(), weights)
                    if layer_index == deepest:
                        raise _StopForward
                return fn

            handles = [self.layers[l].register_forward_hook(hook(l)) for l in set(layers)]
            try:
                self.forward(ids, mask, pos, base_only=True)
            except _StopForward:
                pass
            finally:
                for h in handles:
                    h.remove()
            for j, l in enumerate(layers):
                out[batch, j] = captured[l].cpu()
        return out

    @torch.inference_mode()
    def response_logprobs(self, prompts: Sequence[str], responses: Sequence[str],
                          steer: Steering | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of log p(response token | prefix) per row, and the response token counts.

        Float32 (rows,) on CPU. The LM head runs only on the positions that predict response
        tokens (not the whole vocabulary at every position). With ``steer``, row i is steered by
        row i of ``steer`` at its configured positions.
        """
        if steer is not None and steer.rows != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but steering for {steer.rows} rows")
        encoded = self.encode(prompts, responses)
        totals = torch.zeros(len(encoded), dtype=torch.float32)
        counts = torch.as_tensor([len(e.ids) - e.prompt_len for e in encoded], dtype=torch.long)
        for batch in self.micro_batches([len(e.ids) for e in encoded]):
            ids, mask, pos = self.collate([encoded[i].ids for i in batch], "right")
            starts = torch.as_tensor([encoded[i].prompt_len for i in batch])
            ctx = self.steering(steer.select(batch), starts - 1) if steer is not None else contextlib.nullcontext()
            with ctx:
                hidden = self.forward(ids, mask, pos, base_only=True).last_hidden_state  # (b, seq, hidden)
            nll = self._response_nll(hidden, ids, [encoded[i] for i in batch])
            totals[batch] = -nll.float().cpu()
        return totals, counts

    # ---- attention heads: gating, ablation, attribution ------------------------------------

    def _o_proj(self, layer: int) -> torch.nn.Module:
        attn = getattr(self.layers[layer], "self_attn", None)
        proj = getattr(attn, "o_proj", None)
        if proj is None:
            raise UnsupportedArchitecture(
                f"decoder block {layer} of {type(self.model).__name__} has no self_attn.o_proj: "
                "head gating needs the attention output projection")
        return proj

    def _check_heads(self, heads: Sequence[Head]) -> None:
        bad = [h for h in heads if not (0 <= h[0] < self.num_layers and 0 <= h[1] < self.num_heads)]
        if bad:
            raise ValueError(f"heads {bad[:5]} invalid: this model has layers 0..{self.num_layers - 1} and "
                             f"query heads 0..{self.num_heads - 1}")

    def head_gates(self, head_sets: Sequence[Sequence[Head]]) -> torch.Tensor:
        """Float32 gates (rows, layers, heads): 0 at each row's listed heads, 1 elsewhere."""
        gates = torch.ones((len(head_sets), self.num_layers, self.num_heads), dtype=torch.float32)
        for row, heads in enumerate(head_sets):
            self._check_heads(heads)
            for layer, head in heads:
                gates[row, layer, head] = 0.0
        return gates

    @contextlib.contextmanager
    def _gating_hooks(self, gate_for: "callable", layers: Sequence[int]) -> Iterator[None]:
        """Scale each head's slice of o_proj's input by ``gate_for(layer)`` ((rows, heads) or None)."""
        def hook(layer_index):
            def fn(_module, args):
                gate = gate_for(layer_index)
                if gate is None:
                    return None
                x = args[0]
                b, s, _ = x.shape
                x = (x.view(b, s, self.num_heads, self.head_dim) * gate[:, None, :, None].to(x.dtype)).view(b, s, -1)
                return (x, *args[1:])
            return fn

        handles = [self._o_proj(l).register_forward_pre_hook(hook(l)) for l in sorted(set(layers))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def head_gating(self, gates: torch.Tensor) -> Iterator[None]:
        """Gate every head per row while the context is open: ``gates`` is (rows, layers, heads).

        0 ablates a head, 1 keeps it; gates that require grad give head attributions.
        """
        if gates.ndim != 3 or tuple(gates.shape[1:]) != (self.num_layers, self.num_heads):
            raise ValueError(f"gates must be (rows, {self.num_layers}, {self.num_heads}); got {tuple(gates.shape)}")
        gates = gates.to(self.device)
        layers = range(self.num_layers) if gates.requires_grad else \
            sorted({int(l) for l in (gates != 1).any(dim=(0, 2)).nonzero().flatten()})
        with self._gating_hooks(lambda l: gates[:, l], layers):
            yield

    def _token_nll(self, hidden: torch.Tensor, ids: torch.Tensor, encoded: Sequence[Encoded],
                   chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """−log p of every response token from final hidden states (b, seq, hidden): (row index, nll), flat.

        Tokens are in row order, then position order. The LM head runs only on positions that
        predict response tokens, in chunks that bound the (tokens × vocabulary) logits.
        Differentiable; float32 on the model's device.
        """
        head = self.model.get_output_embeddings()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        scaling = getattr(self.model.config, "logits_scaling", None)  # Granite divides its logits by this
        rows, cols = [], []
        for row, e in enumerate(encoded):
            start, end = e.prompt_len, len(e.ids)
            rows += [row] * (end - start)
            cols += range(start - 1, end - 1)  # position t predicts token t + 1
        r = torch.as_tensor(rows, dtype=torch.long, device=hidden.device)
        c = torch.as_tensor(cols, dtype=torch.long, device=hidden.device)
        if not rows:
            return r, torch.zeros(0, dtype=torch.float32, device=hidden.device)
        tgt = ids[r, c + 1]
        chunk = chunk_tokens or max(256, 2 ** 26 // max(1, head.weight.shape[0]))
        parts = []
        for lo in range(0, len(rows), chunk):
            logits = head(hidden[r[lo:lo + chunk], c[lo:lo + chunk]]).float()
            if scaling:
                logits = logits / scaling
            if cap:
                logits = cap * torch.tanh(logits / cap)
            parts.append(torch.logsumexp(logits, -1) - logits.gather(-1, tgt[lo:lo + chunk, None]).squeeze(-1))
        return r, torch.cat(parts)

    def _response_nll(self, hidden: torch.Tensor, ids: torch.Tensor, encoded: Sequence[Encoded]) -> torch.Tensor:
        """Sum of −log p(response token) per row (float32 (rows,), differentiable)."""
        rows, nll = self._token_nll(hidden, ids, encoded)
        out = torch.zeros(len(encoded), dtype=torch.float32, device=hidden.device)
        return out.index_add(0, rows, nll)

    @torch.inference_mode()
    def token_logprobs(self, encoded: Sequence[Encoded]) -> list[torch.Tensor]:
        """log p of each response token given everything before it: float32 (response len,) per sequence, on CPU."""
        out: list[torch.Tensor] = [torch.zeros(0)] * len(encoded)
        for batch in self.micro_batches([len(e.ids) for e in encoded]):
            ids, mask, pos = self.collate([encoded[i].ids for i in batch], "right")
            hidden = self.forward(ids, mask, pos, base_only=True).last_hidden_state
            _, nll = self._token_nll(hidden, ids, [encoded[i] for i in batch])
            values = (-nll).cpu()
            start = 0
            for i in batch:
                n = len(encoded[i].ids) - encoded[i].prompt_len
                out[i] = values[start:start + n]
                start += n
        return out

    @torch.inference_mode()
    def sequence_nll(self, encoded: Sequence[Encoded], gates: torch.Tensor | None = None,
                     budget: int | None = None) -> torch.Tensor:
        """−log p(response) per sequence (float64 (rows,) on CPU), optionally with per-row head gates.

        The plain path: one forward per micro-batch. ``gates`` is (rows, layers, heads).
        """
        out = torch.zeros(len(encoded), dtype=torch.float64)
        for batch in self.micro_batches([len(e.ids) for e in encoded], budget=budget):
            ids, mask, pos = self.collate([encoded[i].ids for i in batch], "right")
            ctx = self.head_gating(gates[batch]) if gates is not None else contextlib.nullcontext()
            with ctx:
                hidden = self.forward(ids, mask, pos, base_only=True).last_hidden_state
            out[batch] = self._response_nll(hidden, ids, [encoded[i] for i in batch]).double().cpu()
        return out

    @torch.inference_mode()
    def ablation_nll(self, encoded: Sequence[Encoded], heads: Sequence[Head]) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact single-head ablations, batched: (base (seqs,), ablated (len(heads), seqs)) NLL sums.

        ``ablated[i, j]`` is −log p(response j) with head ``heads[i]`` ablated. Variants are batched
        together and *forked* inside the forward pass: ablating a head of block l cannot change
        blocks below l, so a variant's rows are copied from the unablated rows at the input of
        block l rather than computed from the embeddings (about half the work of one full pass
        per head over all 30 blocks). Float64 on CPU.
        """
        heads = [(int(l), int(h)) for l, h in heads]
        self._check_heads(heads)
        base = torch.zeros(len(encoded), dtype=torch.float64)
        ablated = torch.zeros((len(heads), len(encoded)), dtype=torch.float64)
        order = sorted(range(len(heads)), key=lambda i: heads[i])
        budget = self.config.max_batch_tokens
        # base micro-batches leave room for variant copies of their rows
        for batch in self.micro_batches([len(e.ids) for e in encoded], budget=max(1, budget // 8)):
            seqs = [encoded[i] for i in batch]
            ids, mask, pos = self.collate([e.ids for e in seqs], "right")
            per_chunk = max(1, budget // (len(batch) * ids.shape[1]) - 1)
            chunks = [order[i:i + per_chunk] for i in range(0, len(order), per_chunk)] or [[]]
            for n, chunk in enumerate(chunks):
                blocks, nll = self._forked_forward(ids, mask, pos, seqs, [heads[i] for i in chunk],
                                                   keep_base=(n == 0))
                for block, variant in enumerate(blocks):
                    values = nll[block * len(batch):(block + 1) * len(batch)].double().cpu()
                    if variant < 0:
                        base[batch] = values
                    else:
                        ablated[chunk[variant], batch] = values
        return base, ablated

    def _forked_forward(self, ids, mask, pos, seqs: Sequence[Encoded], variants: Sequence[Head], keep_base: bool):
        """One forward whose batch grows at each variant's block: returns (block layout, NLL per row).

        Rows are blocks of ``B = len(seqs)`` rows; block id −1 is unablated, ``v`` ablates
        ``variants[v]``. Decoder-block pre-hooks copy the unablated block for the variants that start
        at that block (and expand the per-row keyword arguments: masks, positions, rotary tables);
        o_proj pre-hooks ablate each variant's head; the unablated block is dropped once no later
        variant needs it (unless ``keep_base``).
        """
        b = len(seqs)
        starts: dict[int, list[int]] = {}
        for v, (layer, _head) in enumerate(variants):
            starts.setdefault(layer, []).append(v)
        last_fork = max(starts) if starts else -1
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
                new = starts.get(layer_index, [])
                if new:
                    hidden = torch.cat([hidden] + [hidden[:b]] * len(new), dim=0)
                    blocks += new
                if layer_index >= last_fork and not keep_base and blocks[0] == -1 and len(blocks) > 1:
                    hidden, blocks = hidden[b:], blocks[1:]
                state["blocks"] = blocks
                gate = torch.ones((len(blocks), self.num_heads), device=hidden.device)
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

        handles = [self.layers[l].register_forward_pre_hook(fork(l), with_kwargs=True)
                   for l in range(self.num_layers)]
        try:
            with self._gating_hooks(lambda l: gates.get(l), sorted(starts)):
                hidden = self.forward(ids, mask, pos, base_only=True).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        blocks = state["blocks"]
        rows = [seqs[i % b] for i in range(len(blocks) * b)]
        return blocks, self._response_nll(hidden, ids.repeat(len(blocks), 1), rows)

    def head_attribution(self, encoded: Sequence[Encoded], groups: Sequence[int], n_groups: int) -> torch.Tensor:
        """∂(mean NLL per token of each group's responses)/∂(head gate) at gates = 1.

        One forward and one backward pass per micro-batch (attribution patching). ``groups[i]``
        says which group (e.g. user) sequence i belongs to; the mean is over all response tokens
        of the group. Returns float64 (n_groups, layers, heads) on CPU. A first-order estimate
        of ablating head h is ΔNLL ≈ −gradient.
        """
        tokens = torch.zeros(n_groups, dtype=torch.float64)
        for e, g in zip(encoded, groups):
            tokens[g] += len(e.ids) - e.prompt_len
        grads = torch.zeros((n_groups, self.num_layers, self.num_heads), dtype=torch.float64)
        group_index = torch.as_tensor(list(groups), dtype=torch.long)
        for batch in self.micro_batches([len(e.ids) for e in encoded]):
            ids, mask, pos = self.collate([encoded[i].ids for i in batch], "right")
            gates = torch.ones((len(batch), self.num_layers, self.num_heads), device=self.device, requires_grad=True)
            with torch.enable_grad(), self.head_gating(gates):
                hidden = self.forward(ids, mask, pos, base_only=True).last_hidden_state
                nll = self._response_nll(hidden, ids, [encoded[i] for i in batch])
                weight = 1.0 / tokens[group_index[batch]].clamp(min=1).to(nll)
                (nll * weight).sum().backward()
            grads.index_add_(0, group_index[batch], gates.grad.double().cpu())
        return grads

    @contextlib.contextmanager
    def steering(self, steer: Steering, response_start: torch.Tensor | None = None) -> Iterator[None]:
        """Add each row's vector to the block outputs while the context is open.

        Mutates the model (installs forward hooks) only inside the context; hooks are always
        removed. ``response_start`` (rows,) is each row's first steered position for
        ``positions='response'`` (its last prompt token, as a 0-based real position).
        """
        layers = self._check_layers(list(steer.vectors))
        everywhere = steer.from_all_positions()
        if not bool(everywhere.all()) and response_start is None:
            raise ValueError("positions='response' needs response_start per row")
        scales = steer.scales.to(self.device)
        vectors = {l: (v.to(self.device, torch.float32) * scales[:, None]) for l, v in steer.vectors.items()}
        # first steered position per row: 0 for 'all' rows; None when every row is steered everywhere
        start = None if bool(everywhere.all()) else \
            torch.where(everywhere, 0, torch.as_tensor(response_start)).to(self.device)

        def hook(layer_index):
            def fn(_module, _inputs, output):
                hidden = output[0] if isinstance(output, tuple) else output
                rows = hidden.shape[0]  # a forward of fewer rows (a shared prefill) is the first rows
                add = vectors[layer_index][:rows, None, :]  # (rows, 1, hidden)
                if start is not None:
                    pos = self._position_ids
                    if pos is None:
                        raise RuntimeError("steering hook ran outside ModelRuntime.forward")
                    add = add * (pos >= start[:rows, None]).unsqueeze(-1)  # (rows, seq, hidden)
                hidden = hidden + add.to(hidden.dtype)
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
            return fn

        handles = [self.layers[l].register_forward_hook(hook(l)) for l in layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64, steer: Steering | None = None,
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
        prompt_seqs = self.prompt_ids(prompts)
        context_seqs = self.prompt_ids(influence.with_context(prompts)) if influence is not None else None
        # micro-batches reserve room for a row's longer branch
        lengths = [len(s) for s in prompt_seqs] if context_seqs is None else \
            [max(len(a), len(c)) for a, c in zip(prompt_seqs, context_seqs)]
        branches = 2 if any(in_contrast) or any(in_influence) else 1
        uniforms = None if sampling is None or sampling.greedy else sampling.uniforms(len(prompts), max_new_tokens)
        results: list[str] = [""] * len(prompts)
        eos = torch.as_tensor(self.eos_token_ids or [-1], device=self.device)
        for batch in self.micro_batches(lengths, extra=max_new_tokens, budget=self.config.max_batch_tokens // branches):
            b = len(batch)
            cache = DynamicCache(config=self.model.config)
            ctx, ids, mask, pos, feed, score, logprob_rows = self._decode_setup(
                batch, prompt_seqs, context_seqs, cache, steer,
                contrast if any(in_contrast[i] for i in batch) else None,
                influence if any(in_influence[i] for i in batch) else None)
            if uniforms is not None:
                # a score that is already a temperature-scaled log-probability (influence) samples at 1
                temperature = torch.where(logprob_rows, 1.0, sampling.temperature).to(self.device)
                u = uniforms[batch].to(self.device)  # (b, max_new_tokens)
            with ctx:
                logits = self.forward(ids, mask, pos, past_key_values=cache, logits_to_keep=1).logits[:, -1]
                done = torch.zeros(b, dtype=torch.bool, device=self.device)
                tokens: list[torch.Tensor] = []
                for step in range(max_new_tokens):
                    scores = score(logits)  # (b, vocab) from (forward rows, vocab)
                    if uniforms is None:
                        nxt = scores.argmax(-1)
                    else:
                        nxt = self._sample(scores, u[:, step], temperature, sampling.top_p)
                    nxt = torch.where(done, self.tokenizer.pad_token_id, nxt)
                    tokens.append(nxt)
                    done |= torch.isin(nxt, eos)
                    if bool(done.all()):
                        break
                    nxt = nxt[feed]  # each forward row (second branches too) is fed its request's token
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                    pos = pos[:, -1:] + 1
                    logits = self.forward(nxt[:, None], mask, pos, past_key_values=cache, logits_to_keep=1).logits[:, -1]
            generated = torch.stack(tokens, dim=1).cpu() if tokens else torch.empty((b, 0), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = generated[row].tolist()
                cut = next((k for k, t in enumerate(seq) if t in self.eos_token_ids), len(seq))
                results[i] = self.tokenizer.decode(seq[:cut], skip_special_tokens=True)
        return results

    def _decode_setup(self, batch: list[int], prompt_seqs: list[list[int]], context_seqs: list[list[int]] | None,
                      cache, steer: Steering | None, contrast: HeadContrast | None, influence: Influence | None):
        """One micro-batch's decoding state: (hooks, ids, mask, positions, feed, score fn, log-prob rows).

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
        feed = torch.as_tensor(list(range(b)) + inf + con, device=self.device)
        ids, mask, pos = self.collate(seqs, "left")

        with contextlib.ExitStack() as stack:  # on an error, hooks installed so far are removed
            if steer is not None:
                rows = steer.select(batch)
                extra = len(seqs) - b  # second branches are never steered
                vectors = {l: torch.cat([v, v.new_zeros((extra, v.shape[1]))]) for l, v in rows.vectors.items()}
                positions = rows.positions if isinstance(rows.positions, str) else rows.positions + ["all"] * extra
                fsteer = Steering(vectors, torch.cat([rows.scales, rows.scales.new_zeros(extra)]), positions)
                start = torch.as_tensor([len(s) - 1 for s in seqs])
                stack.enter_context(self.steering(fsteer, start))
            if con:
                rows = contrast.select([batch[r] for r in con])
                if rows.prefill == "shared" and min(len(s) for s in seqs) >= 2:
                    # the prompts but their last token once, unablated; then copy each contrast row's
                    # cache to its masked branch and feed every forward row its last token
                    n = b + len(inf)
                    self.forward(ids[:n, :-1], mask[:n, :-1], pos[:n, :-1], past_key_values=cache, logits_to_keep=1)
                    cache.reorder_cache(torch.cat([torch.arange(n, device=self.device),
                                                   torch.as_tensor(con, device=self.device)]))
                    ids, pos = ids[:, -1:], pos[:, -1:]
                gates = torch.ones((len(seqs), self.num_layers, self.num_heads))
                gates[b + len(inf):] = self.head_gates(rows.heads)
                stack.enter_context(self.head_gating(gates))
            hooks = stack.pop_all()
        inf_rows = influence.select([batch[r] for r in inf]) if inf else None
        con_rows = contrast.select([batch[r] for r in con]) if con else None
        inf_idx = torch.as_tensor(inf, dtype=torch.long, device=self.device)
        con_idx = torch.as_tensor(con, dtype=torch.long, device=self.device)

        def score(logits: torch.Tensor) -> torch.Tensor:
            out = logits[:b].float()
            if inf:
                second = logits[b:b + len(inf)]
                out[inf_idx] = self._influence_score(torch.cat([logits[inf_idx], second]), inf_rows)
            if con:
                second = logits[b + len(inf):]
                out[con_idx] = self._contrast_score(torch.cat([logits[con_idx], second]), con_rows)
            return out

        logprob_rows = torch.zeros(b, dtype=torch.bool)
        logprob_rows[inf] = True
        return hooks, ids, mask, pos, feed, score, logprob_rows

    @staticmethod
    def _sample(scores: torch.Tensor, u: torch.Tensor, temperature: float | torch.Tensor, top_p: float) -> torch.Tensor:
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

    @staticmethod
    def _influence_score(logits: torch.Tensor, influence: Influence) -> torch.Tensor:
        """out = log_softmax(lp + λ·(lp − lp0)) from the (2 × rows, vocab) step logits (with-context rows first).

        Computed as (1 + λ)·lp − λ·lp0, so λ = 0 gives lp and λ = −1 gives lp0 exactly.
        """
        b = influence.rows
        lp = torch.log_softmax(logits[:b].float() / influence.temperature, -1)
        lp0 = torch.log_softmax(logits[b:].float() / influence.temperature, -1)
        lam = influence.lam.to(lp.device)[:, None]
        return torch.log_softmax((1 + lam) * lp - lam * lp0, -1)

    @staticmethod
    def _contrast_score(logits: torch.Tensor, contrast: HeadContrast) -> torch.Tensor:
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
