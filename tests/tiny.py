"""Test helpers: the tiny models (from the package, shared with the scale benchmark) and JSONL inputs."""

from __future__ import annotations

import re
import json
from pathlib import Path

from steerstore.operators.runtime.tiny import CHAT_TEMPLATE, save_tiny, tiny_config, tiny_model, tiny_tokenizer

__all__ = ["CHAT_TEMPLATE", "save_tiny", "tiny_config", "tiny_model", "tiny_tokenizer", "write_jsonl"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    """Rows as a JSONL input file; returns its path as a string (for input configs)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def answers(out: str) -> tuple[str, str]:
    """The (unsteered, steered) answers `steerstore generate` printed (each line must be there once)."""
    plain = re.findall(r"^  unsteered: (.*)$", out, flags=re.MULTILINE)
    steered = re.findall(r"^  steered:   (.*)$", out, flags=re.MULTILINE)
    assert len(plain) == len(steered) == 1, out
    return plain[0], steered[0]
