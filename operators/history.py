"""A user's history as scoring sequences: item j's output given its input and other items as context.

Shared by the history-based methods (DPS preference heads; SteerX leave-one-out effects): the
prompt of item j holds up to ``k`` *other* items of the same user (never item j itself),
chosen as the most ``recent`` before it, by ``bm25`` similarity to its input, or by ``blocks``
(the scored items cut into consecutive blocks that each share one context: the items that follow
the block, cyclically; see ``context_blocks``), followed by item j's input. The response is item
j's output. Prompts are data for the model; the model's chat template is applied by the runtime.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Literal, Sequence

from steerstore.infra.config import check, option

Selection = Literal["recent", "bm25", "blocks"]
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class HistoryContextConfig:
    context_items: int = option(2, help="other history items shown as context before each scored item (k; "
                                        "arrangement=items)")
    selection: Selection = option(
        "recent", help="which other items: recent (closest before it in time), bm25 (most similar input) or blocks "
                       "(the scored items in consecutive blocks, each block's items behind one shared context: the "
                       "k items after the block, cyclically; the shared context is a token prefix scored once)")
    context_chars: int = option(600, help="each context item's output is cut to this many characters")
    max_items: int = option(8, help="most recent history items scored per user")
    arrangement: Literal["items", "conversation"] = option(
        "items", help="items: one sequence per scored item behind its k context items; conversation (DPS only): the "
                      "scored items as one multi-turn conversation, each output scored after every earlier item "
                      "(each token runs once: ~1/(k+1) of the work)")

    def __post_init__(self) -> None:
        check(self.context_items >= 0, "context_items must be >= 0")
        check(self.context_chars >= 1, "context_chars must be >= 1")
        check(self.max_items >= 1, "max_items must be >= 1")


def _tokens(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text or "")]


def bm25_scores(query: str, documents: Sequence[str], k1: float = 1.5, b: float = 0.75) -> list[float]:
    """Okapi BM25 of ``query`` against each document (IDF over ``documents``)."""
    docs = [_tokens(d) for d in documents]
    if not docs:
        return []
    avg = sum(len(d) for d in docs) / len(docs) or 1.0
    df = Counter(w for d in docs for w in set(d))
    n = len(docs)
    scores = []
    for d in docs:
        tf = Counter(d)
        score = 0.0
        for w in set(_tokens(query)):
            if w in tf:
                idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
                score += idf * tf[w] * (k1 + 1) / (tf[w] + k1 * (1 - b + b * len(d) / avg))
        scores.append(score)
    return scores


def context_blocks(n: int, k: int) -> list[tuple[list[int], list[int]]]:
    """(members, context) of ``n`` items (positions 0..n-1) cut into blocks that each share one context.

    Every item gets c = min(k, n − 1) context items, none of them itself, as with the other selections;
    a block holds up to n − c consecutive items, the most that can share c others, and its context is the
    c items that follow it, cyclically (oldest first). With n = 8 and k = 4: items 0–3 behind items 4–7
    and 4–7 behind 0–3, so each context is computed once for four items instead of once per item.
    """
    c = min(k, n - 1)
    if c <= 0:
        return [([j], []) for j in range(n)]
    size = n - c
    out = []
    for start in range(0, n, size):
        members = list(range(start, min(start + size, n)))
        out.append((members, sorted((start + len(members) + t) % n for t in range(c))))
    return out


def context_indices(items: Sequence[dict], j: int, config: HistoryContextConfig) -> list[int]:
    """Indices of the items shown as context for item ``j`` (never ``j``), oldest first.

    ``blocks`` cuts the scored window (the last ``max_items`` items) into blocks: items older than the
    window are never shown, and an item outside it gets the other selections' ``recent`` context.
    """
    others = [i for i in range(len(items)) if i != j]
    if config.context_items == 0 or not others:
        return []
    first = max(0, len(items) - config.max_items)
    if config.selection == "blocks" and j >= first:
        for members, context in context_blocks(len(items) - first, config.context_items):
            if j - first in members:
                return [first + i for i in context]
    if config.selection in ("recent", "blocks"):
        # items are sorted by time: prefer those before j (closest first), then those after it
        before = [i for i in others if i < j][::-1]
        after = [i for i in others if i > j]
        picked = (before + after)[: config.context_items]
    else:
        scores = bm25_scores(items[j]["input"], [f"{items[i]['input']} {items[i]['output']}" for i in others])
        ranked = sorted(zip(others, scores), key=lambda t: (-t[1], -t[0]))
        picked = [i for i, _ in ranked[: config.context_items]]
    return sorted(picked)


def history_prompt(context: Sequence[dict], prompt: str, config: HistoryContextConfig) -> str:
    """The instruction with ``context`` items shown as the user's earlier responses (none: no history section)."""
    task = f"Write this user's response to the following prompt.\nPrompt: {prompt}"
    if not context:
        return task
    shown = "\n\n".join(
        f"[{n + 1}] Prompt: {item['input']}\nResponse: {item['output'][: config.context_chars]}"
        for n, item in enumerate(context))
    return f"Earlier responses written by this user:\n\n{shown}\n\n{task}"


def retrieved_prompt(train: Sequence[dict], prompt: str, config: HistoryContextConfig) -> str:
    """``prompt`` after the user's ``config.context_items`` training items most similar to it (BM25; retrieved
    history in the prompt, as served with a request's history and evaluated as history in prompt)."""
    picked = context_indices([*train, {"input": prompt}], len(train), dataclasses.replace(config, selection="bm25"))
    return history_prompt([train[i] for i in picked], prompt, config)


def item_prompt(items: Sequence[dict], j: int, config: HistoryContextConfig) -> str:
    """The prompt for scoring item ``j``'s output: its context items, then its input."""
    return history_prompt([items[i] for i in context_indices(items, j, config)], items[j]["input"], config)


def scoring_sequences(histories: Sequence[dict], config: HistoryContextConfig) -> list[tuple[str, str]]:
    """(prompt, output) for the user's ``max_items`` most recent items (histories sorted by time).

    With ``arrangement='conversation'`` the prompts hold no context items: they are the turns of one
    conversation, in time order, where the earlier turns are the context (``TextEncoder.encode_conversation``).
    """
    items = list(histories)
    first = max(0, len(items) - config.max_items)
    if config.arrangement == "conversation":
        return [(history_prompt([], items[j]["input"], config), items[j]["output"]) for j in range(first, len(items))]
    return [(item_prompt(items, j, config), items[j]["output"]) for j in range(first, len(items))]
