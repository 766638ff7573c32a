"""Text to tokens: templated prompts, length-bucketed micro-batches and padded collation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from steerstore.operators.runtime.sources import resolve_model_path

from .loading import ModelConfig


@dataclass
class Encoded:
    """One tokenised sequence: prompt tokens (templated) followed by response tokens.

    A conversation (``TextEncoder.encode_conversation``) scores several responses, one per
    assistant turn: ``turns`` holds each one's [start, end) token positions, and ``prompt_len``
    is the first one's start. Plain sequences score [prompt_len, len(ids)).
    """

    ids: list[int]
    prompt_len: int
    turns: list[tuple[int, int]] | None = None

    @property
    def spans(self) -> list[tuple[int, int]]:
        """The scored token positions, [start, end) per response."""
        return self.turns if self.turns is not None else [(self.prompt_len, len(self.ids))]

    @property
    def scored(self) -> int:
        """How many tokens are scored."""
        return sum(end - start for start, end in self.spans)


class TextEncoder:
    """How text becomes tokens, shared by the runtime and by validation (which needs no weights)."""

    def __init__(self, tokenizer, use_chat_template: bool = True):
        self.tokenizer = tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.templated = use_chat_template and bool(getattr(tokenizer, "chat_template", None))

    @classmethod
    def load(cls, config: ModelConfig) -> "TextEncoder":
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

    def encode_conversation(self, turns: Sequence[tuple[str, str]]) -> Encoded:
        """One multi-turn conversation: each (prompt, response) a user turn then an assistant turn; every
        response is scored given the turns before it (``Encoded.turns``).

        Each turn's template text is tokenised apart from the responses (raw tokens, as ``encode``
        gives them), so a response's tokens are those of the same text scored alone. Needs a chat
        template that extends a conversation turn by turn (each rendering a prefix of the next; one
        that trims an assistant turn's whitespace, as Llama 3's does, is fine: the template text
        after a response is taken from its own rendering). Without a template, turns are joined as
        plain text.
        """
        if not turns:
            raise ValueError("a conversation needs at least one turn")
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        done = ""  # the text rendered so far (through the previous response, as the template renders it)
        messages: list[dict] = []
        for n, (prompt, response) in enumerate(turns):
            messages.append({"role": "user", "content": prompt})
            if self.templated:
                head = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                if not head.startswith(done):
                    raise ValueError("the chat template does not extend a conversation turn by turn (it rewrites "
                                     "earlier turns): use one sequence per item (dps.history.arrangement=items)")
                piece = head[len(done):]
                messages.append({"role": "assistant", "content": response})
                full = self.tokenizer.apply_chat_template(messages, tokenize=False)
                shown = next((r for r in (response, response.strip()) if full.startswith(head + r)), None)
                if shown is None:
                    raise ValueError("the chat template changes an assistant turn's text: use one sequence per "
                                     "item (dps.history.arrangement=items)")
                done = head + shown
                piece_ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
            else:
                piece = prompt if n == 0 else "\n\n" + prompt  # encode's layout: the response follows its prompt
                piece_ids = self.tokenizer(piece, add_special_tokens=(n == 0))["input_ids"]
            ids += piece_ids
            start = len(ids)
            ids += self.response_ids([response])[0]
            spans.append((start, len(ids)))
        return Encoded(ids, spans[0][0], spans)


def micro_batches(lengths: Sequence[int], budget: int, extra: int = 0) -> list[list[int]]:
    """Indices grouped by similar length so each padded batch stays under ``budget`` tokens.

    ``extra`` tokens are reserved per row (new tokens during generation); a sequence longer
    than the budget still gets a batch of its own.
    """
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


def collate(seqs: Sequence[Sequence[int]], pad_token_id: int, device: torch.device,
            padding_side: Literal["left", "right"] = "right"):
    """Pad to a batch: (input_ids, attention_mask, position_ids), positions 0.. per real token."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
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
    return ids.to(device), mask.to(device), positions.to(device)
