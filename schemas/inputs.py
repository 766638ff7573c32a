"""Input tables — ``histories`` and ``preference_pairs`` — and their row validation.

``heldout`` (``HELDOUT_SCHEMA``) is no refresh input: it holds, per user, prompts and the user's
own real ``target`` text to compare generations against (written by the LaMP/LongLaMP importers).

Rows arrive as parsed JSON objects (from JSONL lines) or Parquet rows. ``validate_record``
returns either a clean typed record or a reason; bad rows become quarantine rows, never
exceptions. Checks that need several rows (duplicate ids, too few rows per user) run in the
per-user prepare step (``operators/prepare.py``).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

INPUT_SCHEMA_VERSION = 1
InputKind = Literal["histories", "preference_pairs"]

HISTORIES_SCHEMA = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("input", pa.string(), nullable=False),
    pa.field("output", pa.string(), nullable=False),
    pa.field("timestamp", pa.timestamp("us", tz="UTC")),
], metadata={"steerstore.table": "histories", "steerstore.schema_version": str(INPUT_SCHEMA_VERSION)})

PREFERENCE_PAIRS_SCHEMA = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("pair_id", pa.string(), nullable=False),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("chosen", pa.string(), nullable=False),
    pa.field("rejected", pa.string(), nullable=False),
    pa.field("weight", pa.float64()),
], metadata={"steerstore.table": "preference_pairs", "steerstore.schema_version": str(INPUT_SCHEMA_VERSION)})

HELDOUT_SCHEMA = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("input", pa.string(), nullable=False),    # the prompt/opening given to the model
    pa.field("target", pa.string(), nullable=False),   # the user's real text to compare against
    pa.field("timestamp", pa.timestamp("us", tz="UTC")),
], metadata={"steerstore.table": "heldout", "steerstore.schema_version": str(INPUT_SCHEMA_VERSION)})

INPUT_SCHEMAS: dict[str, pa.Schema] = {"histories": HISTORIES_SCHEMA, "preference_pairs": PREFERENCE_PAIRS_SCHEMA}

# which field identifies a row within a user, and which text fields must be non-empty
ID_FIELD = {"histories": "item_id", "preference_pairs": "pair_id"}
TEXT_FIELDS = {"histories": ("input", "output"), "preference_pairs": ("prompt", "chosen", "rejected")}
# (prompt-like field, response-like fields) whose token count is limited
TOKEN_CHECKED = {"histories": ("input", ("output",)), "preference_pairs": ("prompt", ("chosen", "rejected"))}


@dataclass
class HistoryItem:
    """One thing a user wrote: ``output`` in answer to ``input``."""

    user_id: str
    item_id: str
    input: str
    output: str
    timestamp: dt.datetime | None = None


@dataclass
class PreferencePair:
    """The user preferred ``chosen`` over ``rejected`` as an answer to ``prompt``."""

    user_id: str
    pair_id: str
    prompt: str
    chosen: str
    rejected: str
    weight: float | None = None


def parse_timestamp(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    if isinstance(value, bool):
        raise ValueError("timestamp must be ISO-8601 text or epoch seconds, got a boolean")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError("timestamp is not finite")
        if not EPOCH_RANGE[0] <= value <= EPOCH_RANGE[1]:
            raise ValueError(f"timestamp {value!r} is out of range: epoch seconds between 1900 and 2200 are "
                             "expected (is it in milliseconds or nanoseconds?)")
        return dt.datetime.fromtimestamp(value, tz=dt.timezone.utc)
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except (ValueError, OverflowError):
            raise ValueError(f"timestamp {value[:40]!r} is not ISO-8601 text or epoch seconds") from None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)
    raise ValueError(f"timestamp must be ISO-8601 text or epoch seconds, got {type(value).__name__}")


MAX_WEIGHT = 1000.0  # pair weights are numbers in [0, MAX_WEIGHT]; each user's are then scaled to mean 1
# epoch-second timestamps between 1900 and 2200 (larger numbers are milliseconds or nanoseconds by mistake)
EPOCH_RANGE = (-2_208_988_800, 7_258_118_400)


def is_text(value: Any) -> bool:
    """A string that is valid Unicode (no lone surrogate, as JSON's ``\\ud800`` escapes can produce)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def user_id_of(row: Any) -> str | None:
    """The row's user id when it is valid text, else None (the row is then quarantined without a user)."""
    uid = row.get("user_id") if isinstance(row, dict) else None
    return uid if is_text(uid) else None


def validate_record(kind: InputKind, row: Any, max_weight: float = MAX_WEIGHT) -> tuple[dict | None, str | None]:
    """Check one parsed row. Returns (clean record, None) or (None, reason)."""
    if not isinstance(row, dict):
        return None, f"row is a JSON {type(row).__name__}, expected an object"
    clean: dict[str, Any] = {}
    for name in ("user_id", ID_FIELD[kind], *TEXT_FIELDS[kind]):
        if name not in row or row[name] is None:
            return None, f"missing field {name!r}"
        value = row[name]
        if not isinstance(value, str):
            return None, f"field {name!r} must be a string, got {type(value).__name__}"
        if not is_text(value):
            return None, f"field {name!r} is not valid Unicode (a lone surrogate)"
        clean[name] = value
    for name in ("user_id", ID_FIELD[kind]):
        if not clean[name].strip():
            return None, f"field {name!r} is empty"
    for name in TEXT_FIELDS[kind]:
        if not clean[name].strip():
            return None, f"empty text in field {name!r}"
    if kind == "preference_pairs":
        weight = row.get("weight")
        if weight is not None:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                return None, f"field 'weight' must be a number, got {type(weight).__name__}"
            try:
                weight = float(weight)
            except OverflowError:
                return None, f"field 'weight' must be a number in [0, {max_weight:g}], got an integer of " \
                             f"{row['weight'].bit_length()} bits"
            if not math.isfinite(weight) or not 0 <= weight <= max_weight:
                return None, f"field 'weight' must be a number in [0, {max_weight:g}], got {weight!r}"
        clean["weight"] = weight
        if clean["chosen"] == clean["rejected"]:
            return None, "chosen and rejected are identical"
    else:
        try:
            clean["timestamp"] = parse_timestamp(row.get("timestamp"))
        except ValueError as exc:
            return None, str(exc)
    # unknown extra fields are allowed: they are ignored (and kept in a quarantined row's raw text)
    return clean, None


def parse_json_line(line: str) -> tuple[Any, str | None]:
    """Parse one JSONL line: (value, None) or (None, reason)."""
    try:
        return json.loads(line), None
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} at column {exc.colno}"
    except (ValueError, RecursionError) as exc:  # an integer of over 4,300 digits; nesting too deep
        return None, f"invalid JSON: {type(exc).__name__}: {str(exc)[:200]}"


def raw_text(row: Any, limit: int = 2000) -> str:
    """The row as JSON text for the quarantine table (truncated)."""
    try:
        text = row if isinstance(row, str) else json.dumps(row, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(row)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates as \\udXXX escapes
    return text if len(text) <= limit else text[:limit] + "…"
