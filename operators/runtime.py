"""The model runtime every operator shares.

One place for: loading a model (the packaged default or any Hugging Face folder/hub id),
recording its id and weights fingerprint, resolving decoder layers per architecture,
tokenising prompt/response pairs, length-bucketed micro-batching, batched activation capture,
residual-stream steering with a different vector per batch row, and greedy decoding.

Layer numbering (the store's contract): layer i is the output of decoder block i, i.e.
Hugging Face ``hidden_states[i + 1]`` and llama.cpp ``direction.i``.

Position contract for steering: ``response`` positions are those whose output predicts a
response token — the last prompt token and every token after it (in generation: the last
prompt token, then every generated token). ``all`` is every non-padding position.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import torch

from infra.config import check, option
from infra.models import DEFAULT_MODEL, canonical_model_id, resolve_model_path

Position = Literal["mean", "last"]
SteerPositions = Literal["response", "all"]

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
    including unsteered ones.
    """

    vectors: dict[int, torch.Tensor]  # layer -> (rows, hidden)
    scales: torch.Tensor  # (rows,)
    positions: SteerPositions = "response"
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.scales = torch.as_tensor(self.scales, dtype=torch.float32).reshape(-1)
        self.rows = int(self.scales.shape[0])
        for layer, vec in self.vectors.items():
            if vec.ndim != 2 or vec.shape[0] != self.rows:
                raise ValueError(
                    f"steering vector for layer {layer} has shape {tuple(vec.shape)}; "
                    f"expected ({self.rows}, hidden)")

    def select(self, rows: Sequence[int]) -> "Steering":
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        return Steering({l: v[idx] for l, v in self.vectors.items()}, self.scales[idx], self.positions)


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

    def micro_batches(self, lengths: Sequence[int], extra: int = 0) -> list[list[int]]:
        """Indices grouped by similar length so each padded batch stays under max_batch_tokens.

        ``extra`` tokens are reserved per row (new tokens during generation).
        """
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for i in order:
            size = lengths[i] + extra
            if current and max(longest, size) * (len(current) + 1) > self.config.max_batch_tokens:
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
        head = self.model.get_output_embeddings()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        for batch in self.micro_batches([len(e.ids) for e in encoded]):
            ids, mask, pos = self.collate([encoded[i].ids for i in batch], "right")
            starts = torch.as_tensor([encoded[i].prompt_len for i in batch])
            ctx = self.steering(steer.select(batch), starts - 1) if steer is not None else contextlib.nullcontext()
            with ctx:
                hidden = self.forward(ids, mask, pos, base_only=True).last_hidden_state  # (b, seq, hidden)
            for row, i in enumerate(batch):
                start, end = encoded[i].prompt_len, len(encoded[i].ids)
                if end == start:
                    continue
                logits = head(hidden[row, start - 1: end - 1]).float()  # predicts tokens start..end-1
                if cap:
                    logits = cap * torch.tanh(logits / cap)
                targets = ids[row, start:end]
                totals[i] = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).sum().cpu()
        return totals, counts

    @contextlib.contextmanager
    def steering(self, steer: Steering, response_start: torch.Tensor | None = None) -> Iterator[None]:
        """Add each row's vector to the block outputs while the context is open.

        Mutates the model (installs forward hooks) only inside the context; hooks are always
        removed. ``response_start`` (rows,) is each row's first steered position for
        ``positions='response'`` (its last prompt token, as a 0-based real position).
        """
        layers = self._check_layers(list(steer.vectors))
        if steer.positions == "response" and response_start is None:
            raise ValueError("positions='response' needs response_start per row")
        scales = steer.scales.to(self.device)
        vectors = {l: (v.to(self.device, torch.float32) * scales[:, None]) for l, v in steer.vectors.items()}
        start = response_start.to(self.device) if response_start is not None else None

        def hook(layer_index):
            def fn(_module, _inputs, output):
                hidden = output[0] if isinstance(output, tuple) else output
                add = vectors[layer_index][:, None, :]  # (rows, 1, hidden)
                if steer.positions == "response":
                    pos = self._position_ids
                    if pos is None:
                        raise RuntimeError("steering hook ran outside ModelRuntime.forward")
                    add = add * (pos >= start[:, None]).unsqueeze(-1)  # (rows, seq, hidden)
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
    def generate(self, prompts: Sequence[str], max_new_tokens: int = 64,
                 steer: Steering | None = None) -> list[str]:
        """Greedy decoding, batched (left padding, explicit positions, a KV cache per batch).

        With ``steer``, row i of ``prompts`` is steered by row i of ``steer``.
        """
        from transformers import DynamicCache

        if steer is not None and steer.rows != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but steering for {steer.rows} rows")
        prompt_seqs = self.prompt_ids(prompts)
        results: list[str] = [""] * len(prompts)
        eos = torch.as_tensor(self.eos_token_ids or [-1], device=self.device)
        for batch in self.micro_batches([len(s) for s in prompt_seqs], extra=max_new_tokens):
            ids, mask, pos = self.collate([prompt_seqs[i] for i in batch], "left")
            start = torch.as_tensor([len(prompt_seqs[i]) - 1 for i in batch])
            ctx = self.steering(steer.select(batch), start) if steer is not None else contextlib.nullcontext()
            with ctx:
                cache = DynamicCache(config=self.model.config)
                logits = self.forward(ids, mask, pos, past_key_values=cache, logits_to_keep=1).logits
                done = torch.zeros(len(batch), dtype=torch.bool, device=self.device)
                tokens: list[torch.Tensor] = []
                for _ in range(max_new_tokens):
                    nxt = logits[:, -1].argmax(-1)
                    nxt = torch.where(done, self.tokenizer.pad_token_id, nxt)
                    tokens.append(nxt)
                    done |= torch.isin(nxt, eos)
                    if bool(done.all()):
                        break
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                    pos = pos[:, -1:] + 1
                    logits = self.forward(nxt[:, None], mask, pos, past_key_values=cache, logits_to_keep=1).logits
            generated = torch.stack(tokens, dim=1).cpu() if tokens else torch.empty((len(batch), 0), dtype=torch.long)
            for row, i in enumerate(batch):
                seq = generated[row].tolist()
                cut = next((k for k, t in enumerate(seq) if t in self.eos_token_ids), len(seq))
                results[i] = self.tokenizer.decode(seq[:cut], skip_special_tokens=True)
        return results
