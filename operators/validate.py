"""Validate input rows: each becomes a clean record or a quarantine record with a reason."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from steerstore.infra.config import check, option
from steerstore.operators.runtime import ModelConfig, TextEncoder
from steerstore.schemas.inputs import (
    ID_FIELD,
    MAX_WEIGHT,
    TOKEN_CHECKED,
    InputKind,
    is_text,
    parse_json_line,
    raw_text,
    user_id_of,
    validate_record,
)
from steerstore.schemas.store import RECORD_SCHEMA

log = logging.getLogger("steerstore")


@dataclass
class ValidateConfig:
    max_tokens: int = option(
        1024, help="longest prompt+response (in model tokens, chat template included) accepted; longer rows are quarantined")
    max_weight: float = option(
        MAX_WEIGHT, help="largest pair weight accepted (weights are numbers in [0, max_weight]; each user's weights "
                         "are then scaled to mean 1, so no user outweighs another by their weights)")

    def __post_init__(self) -> None:
        check(self.max_tokens >= 8, "validate.max_tokens must be >= 8")
        check(0 < self.max_weight < 1e30, "validate.max_weight must be in (0, 1e30)")


def require_columns(operator: str, table: pa.Table, columns: list[str]) -> None:
    """Fail with a message naming the operator and the missing columns (convention 2)."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise KeyError(f"{operator}: input batch lacks columns {missing} (has {table.column_names})")


class ValidateRecords:
    """Batch of raw input rows -> RECORD_SCHEMA rows (status ok | quarantined). Rows in == rows out.

    Accepts JSON text rows (``text``, with ``path``, ``line`` and ``problem`` as the refresh's
    reader gives) or typed rows. ``path:line`` is kept as the row's source. No row raises:
    whatever fails on a row (parsing, a type, Unicode, the tokenizer) quarantines that row.
    """

    def __init__(self, kind: InputKind, config: ValidateConfig, model: ModelConfig):
        self.kind = kind
        self.config = config
        self.text = TextEncoder.load(model)  # tokenizer only: counts tokens as the model will

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        paths = batch.column("path").to_pylist() if "path" in batch.column_names else [None] * n
        lines = batch.column("line").to_pylist() if "line" in batch.column_names else [None] * n
        sources = [p if p is None or ln is None else f"{p}:{ln}" for p, ln in zip(paths, lines)]
        if "text" in batch.column_names and "user_id" not in batch.column_names:
            raws = batch.column("text").to_pylist()
            problems = batch.column("problem").to_pylist() if "problem" in batch.column_names else [None] * n
            parsed = []
            for line, problem in zip(raws, problems):
                row, error = parse_json_line(line) if line and line.strip() else (None, "empty line")
                parsed.append((row, problem or error))  # a problem row still names its user when it parses
        else:
            require_columns(type(self).__name__, batch, ["user_id", ID_FIELD[self.kind]])
            rows = batch.drop_columns([c for c in ("path", "line") if c in batch.column_names]).to_pylist()
            parsed = [(row, None) for row in rows]
            raws = rows
        out: list[dict[str, Any]] = []
        checked: list[tuple[int, dict]] = []
        for (row, error), raw, source in zip(parsed, raws, sources):
            record = {"kind": self.kind, "source": source, "raw": raw_text(raw), "status": "ok", "reason": None}
            try:
                if isinstance(row, dict):
                    rid = row.get(ID_FIELD[self.kind])
                    record["user_id"] = user_id_of(row)
                    record["record_id"] = rid if is_text(rid) else (None if rid is None else raw_text(rid, 200))
                clean, reason = (None, error) if error else validate_record(self.kind, row, self.config.max_weight)
            except Exception as exc:  # noqa: BLE001 — whatever a row holds, it becomes a quarantine row
                clean, reason = None, f"row could not be validated: {type(exc).__name__}: {str(exc)[:200]}"
            if clean is None:
                record.update(status="quarantined", reason=reason)
            else:
                record.update(clean)
                record["record_id"] = clean[ID_FIELD[self.kind]]
                checked.append((len(out), clean))
            out.append(record)
        try:
            self._check_token_lengths(out, checked)
        except Exception:  # noqa: BLE001 — the tokenizer failed on some row: find it, one row at a time
            for item in checked:
                try:
                    self._check_token_lengths(out, [item])
                except Exception as exc:  # noqa: BLE001
                    out[item[0]].update(status="quarantined",
                                        reason=f"the tokenizer failed on the row: {type(exc).__name__}")
        return pa.Table.from_pylist(out, schema=RECORD_SCHEMA)

    def _check_token_lengths(self, out: list[dict], checked: list[tuple[int, dict]]) -> None:
        if not checked:
            return
        prompt_field, response_fields = TOKEN_CHECKED[self.kind]
        prompt_lens = [len(ids) for ids in self.text.prompt_ids([c[prompt_field] for _, c in checked])]
        for field in response_fields:
            resp_lens = [len(ids) for ids in self.text.response_ids([c[field] for _, c in checked])]
            for (index, _), p, r in zip(checked, prompt_lens, resp_lens):
                if out[index]["status"] == "ok" and p + r > self.config.max_tokens:
                    out[index].update(
                        status="quarantined",
                        reason=f"text over token limit: {field} with its prompt is {p + r} tokens "
                               f"(validate.max_tokens={self.config.max_tokens})")


def isolate_failures(users: list, compute, on_error) -> list[dict]:
    """``compute(users)``; if the batch fails, each user alone, and ``on_error(user, exc)`` for those that still fail.

    One bad user never sinks a batch: the model actors (CAA, DPS, SteerX) all run this way.
    """
    try:
        return compute(users)
    except Exception as exc:  # noqa: BLE001 — isolate the failing user(s) below
        if len(users) > 1:  # not silent: a batch that fails for its size (out of memory) costs a pass per user
            log.warning("a batch of %d users failed (%s: %s); computing them one at a time", len(users),
                        type(exc).__name__, str(exc)[:200])
        rows: list[dict] = []
        for user in users:
            try:
                rows += compute([user])
            except Exception as exc:  # noqa: BLE001
                rows.append(on_error(user, exc))
        return rows
