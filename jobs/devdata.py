"""The development data (``../shared/data``): one reader for the eval job, benchmarks and experiments.

Each source is a gzip JSON Lines file, one user per line: ``{"user_id", "meta", "items": [{"id",
"date"?, "text"}]}``. A personalised-generation task is built from a text the way LongLaMP
builds one: its opening sentence is the prompt (``PROMPT``), the user's own continuation the
target. The folder is not part of the project; a missing file raises ``FileNotFoundError``
naming where it should be, and tests that need it skip.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from pathlib import Path

SOURCES = {"blogs": "blogs-dev.jsonl.gz", "synthpai": "synthpai-dev.jsonl.gz"}
PROMPT = "Continue this text in the same voice, in one short paragraph:\n\n{opening}"
DEFAULT_DIR = "../shared/data"


def path_of(data_dir: str, source: str) -> Path:
    """The file of ``source`` in ``data_dir``; FileNotFoundError with the fix when it is absent."""
    if source not in SOURCES:
        raise ValueError(f"unknown development source {source!r}; known: {sorted(SOURCES)}")
    path = Path(data_dir) / SOURCES[source]
    if not path.exists():
        raise FileNotFoundError(
            f"development data {SOURCES[source]} not found in {Path(data_dir).resolve()} (it lives in "
            "../shared/data beside the project checkout, never in the repository); pass your own data instead")
    return path


# Development users are split once, by a hash of their id, into a tuning half (defaults are chosen
# on it: steerstore bench tau) and an evaluation half (steerstore eval uses it by default), so no
# evaluated user has shaped a default it is evaluated with.
PARTITIONS = ("tune", "eval", "all")


def partition(user_id: str) -> str:
    """'tune' or 'eval': a fixed half of the development users each (sha256 of the id)."""
    return "tune" if hashlib.sha256(f"steerstore-dev:{user_id}".encode()).digest()[0] % 2 == 0 else "eval"


def in_partition(user_id: str, which: str) -> bool:
    if which not in PARTITIONS:
        raise ValueError(f"unknown development partition {which!r}; known: {list(PARTITIONS)}")
    return which == "all" or partition(user_id) == which


def available(data_dir: str = DEFAULT_DIR, sources: tuple[str, ...] = tuple(SOURCES)) -> bool:
    """Whether every file of ``sources`` is present (tests skip otherwise)."""
    return all((Path(data_dir) / SOURCES[s]).exists() for s in sources)


def read_users(data_dir: str, source: str) -> list[dict]:
    """Every user of ``source``, sorted by user id (each user's items in file order)."""
    with gzip.open(path_of(data_dir, source), "rt", encoding="utf-8") as fh:
        users = [json.loads(line) for line in fh if line.strip()]
    return sorted(users, key=lambda u: u["user_id"])


def split_opening(text: str, words: int) -> tuple[str, str] | None:
    """(opening sentence, continuation of at most ``words`` words), or None when the text is too short."""
    text = re.sub(r"\s+", " ", text).strip()
    m = re.search(r"(?<=[.!?])\s", text[20:300])
    if not m:
        return None
    cut = 20 + m.start()
    opening, rest = text[:cut].strip(), text[cut:].split()
    if len(rest) < words // 2 or len(opening.split()) < 4:
        return None
    return opening, " ".join(rest[:words])


def segments(data_dir: str, source: str, need: int, words: int, rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """user_id -> (opening, continuation) of each of their texts (shuffled by ``rng``), users with >= ``need``."""
    out = {}
    for user in read_users(data_dir, source):
        items = sorted(user["items"], key=lambda it: it["id"])
        rng.shuffle(items)
        split = [s for s in (split_opening(it["text"], words) for it in items) if s]
        if len(split) >= need:
            out[user["user_id"]] = split
    return out
