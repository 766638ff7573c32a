"""Importers: turn public preference data into steerstore's ``preference_pairs`` JSONL.

Launch: ``steerstore import --format prism --input conversations.jsonl --output pairs.jsonl``

- ``prism``: PRISM's ``conversations.jsonl``. In each turn the model response with
  ``if_chosen: true`` is ``chosen``, and every other response of that turn is a ``rejected``.
  The weight is the score gap (1–100 scale) divided by 100, at least 0.01, because an explicit
  choice always counts a little. The prompt is the user's message; for later turns it is
  preceded by the earlier exchange ("User: … / Assistant: …", the chosen replies).
- ``plain``: JSONL with ``user_id``, ``prompt``, ``chosen``, ``rejected`` and an optional
  ``weight`` or ``pair_id``. A missing ``pair_id`` becomes a content hash, so re-imports are
  stable and duplicates stay detectable.

Rows that cannot become pairs are not dropped silently: the summary counts them by reason,
and the summary is written beside the output as ``<output>.import.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Literal

from infra import storage
from infra.config import check, option
from infra.storage import StorageConfig


@dataclass
class ImportConfig:
    format: Literal["prism", "plain"] = option("prism", help="input format")
    input: str = option("", help="input JSONL (local or s3://)")
    output: str = option("", help="output preference_pairs JSONL (local or s3://)")
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig, metadata={"help": "object storage"})

    def __post_init__(self) -> None:
        check(bool(self.input) and bool(self.output), "--input and --output are required")


def _lines(text: str, skipped: Counter) -> Iterator[dict]:
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped["invalid JSON line"] += 1
            continue
        if isinstance(row, dict):
            yield row
        else:
            skipped["line is not a JSON object"] += 1


def prism_pairs(text: str, skipped: Counter) -> Iterator[dict]:
    for conv in _lines(text, skipped):
        user, cid, history = conv.get("user_id"), conv.get("conversation_id"), conv.get("conversation_history")
        if not isinstance(user, str) or not isinstance(history, list):
            skipped["conversation without user_id or conversation_history"] += 1
            continue
        turns: dict[int, dict] = {}
        for msg in history:
            if not isinstance(msg, dict) or not isinstance(msg.get("turn"), int):
                skipped["message without a turn number"] += 1
                continue
            t = turns.setdefault(msg["turn"], {"user": None, "models": []})
            if msg.get("role") == "user":
                t["user"] = msg.get("content")
            elif msg.get("role") == "model":
                t["models"].append(msg)
        context = ""
        for turn in sorted(turns):
            t = turns[turn]
            chosen = [m for m in t["models"] if m.get("if_chosen") is True]
            if not isinstance(t["user"], str) or len(chosen) != 1 or len(t["models"]) < 2:
                skipped["turn without a user message, exactly one chosen and another response"] += 1
                continue
            best = chosen[0]
            prompt = (context + "User: " + t["user"]) if context else t["user"]
            for other in t["models"]:
                if other is best:
                    continue
                gap = _score(best) - _score(other) if _score(best) is not None and _score(other) is not None else None
                yield {"user_id": user, "pair_id": f"{cid}-t{turn}-{other.get('within_turn_id', id(other))}",
                       "prompt": prompt, "chosen": best.get("content"), "rejected": other.get("content"),
                       "weight": max(gap, 1) / 100 if gap is not None else 1.0}
            context += f"User: {t['user']}\nAssistant: {best.get('content')}\n"


def _score(msg: dict) -> float | None:
    s = msg.get("score")
    return float(s) if isinstance(s, (int, float)) and not isinstance(s, bool) else None


def plain_pairs(text: str, skipped: Counter) -> Iterator[dict]:
    for row in _lines(text, skipped):
        if not all(isinstance(row.get(f), str) for f in ("user_id", "prompt", "chosen", "rejected")):
            skipped["row without string user_id, prompt, chosen and rejected"] += 1
            continue
        pid = row.get("pair_id")
        if not isinstance(pid, str) or not pid:
            pid = "h" + hashlib.sha256(json.dumps(
                [row["user_id"], row["prompt"], row["chosen"], row["rejected"]]).encode()).hexdigest()[:16]
        out = {"user_id": row["user_id"], "pair_id": pid, "prompt": row["prompt"], "chosen": row["chosen"],
               "rejected": row["rejected"]}
        if row.get("weight") is not None:
            out["weight"] = row["weight"]
        yield out


def main(config: ImportConfig) -> dict:
    skipped: Counter = Counter()
    text = storage.read_text(config.input, config.storage)
    pairs = list((prism_pairs if config.format == "prism" else plain_pairs)(text, skipped))
    storage.write_text(config.output, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs),
                       config.storage)
    summary = {"format": config.format, "input": config.input, "output": config.output, "pairs": len(pairs),
               "users": len({p["user_id"] for p in pairs}), "skipped": dict(skipped)}
    storage.write_text(config.output + ".import.json", json.dumps(summary, indent=2), config.storage)
    print(json.dumps(summary, indent=2))
    return summary
