"""Text to tokens: templated prompts, length-bucketed micro-batches and padded collation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from steerstore.operators.runtime.sources import resolve_model_path

from .loading import ModelConfig


@dataclass
class Encoded:
    """One tokenised sequence: prompt tokens (templated) followed by response tokens."""

    ids: list[int]
    prompt_len: int


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
