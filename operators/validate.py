"""Validate input rows: each becomes a clean record or a quarantine record with a reason."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from steerstore.infra.config import check, option
from steerstore.operators.runtime import ModelConfig, TextEncoder
from steerstore.schemas.inputs import ID_FIELD, TOKEN_CHECKED, InputKind, parse_json_line, raw_text, validate_record
from steerstore.schemas.store import RECORD_SCHEMA


@dataclass
class ValidateConfig:
    max_tokens: int = option(
        1024, help="longest prompt+response (in model tokens, chat template included) accepted; longer rows are quarantined")

    def __post_init__(self) -> None:
        check(self.max_tokens >= 8, "validate.max_tokens must be >= 8")


def require_columns(operator: str, table: pa.Table, columns: list[str]) -> None:
    """Fail with a message naming the operator and the missing columns (convention 2)."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise KeyError(f"{operator}: input batch lacks columns {missing} (has {table.column_names})")


class ValidateRecords:
    """Batch of raw input rows -> RECORD_SCHEMA rows (status ok | quarantined). Rows in == rows out.

    Accepts JSONL lines (a ``text`` column, as ``ray.data.read_text`` gives) or typed rows
    (Parquet columns). ``path`` is kept as the row's source when present.
    """

    def __init__(self, kind: InputKind, config: ValidateConfig, model: ModelConfig):
        self.kind = kind
        self.config = config
        self.text = TextEncoder.load(model)  # tokenizer only: counts tokens as the model will

    def __call__(self, batch: pa.Table) -> pa.Table:
        sources = batch.column("path").to_pylist() if "path" in batch.column_names else [None] * batch.num_rows
        if "text" in batch.column_names and "user_id" not in batch.column_names:
            parsed = [parse_json_line(line) if line and line.strip() else (None, "empty line")
                      for line in batch.column("text").to_pylist()]
            raws = batch.column("text").to_pylist()
        else:
            require_columns(type(self).__name__, batch, ["user_id", ID_FIELD[self.kind]])
            rows = batch.drop_columns([c for c in ("path",) if c in batch.column_names]).to_pylist()
            parsed = [(row, None) for row in rows]
            raws = rows
        out: list[dict[str, Any]] = []
        checked: list[tuple[int, dict]] = []
        for (row, error), raw, source in zip(parsed, raws, sources):
            record = {"kind": self.kind, "source": source, "raw": raw_text(raw), "status": "ok", "reason": None}
            if isinstance(row, dict):
                uid, rid = row.get("user_id"), row.get(ID_FIELD[self.kind])
                record["user_id"] = uid if isinstance(uid, str) else None
                record["record_id"] = rid if isinstance(rid, str) else (None if rid is None else str(rid))
            clean, reason = (None, error) if error else validate_record(self.kind, row)
            if clean is None:
                record.update(status="quarantined", reason=reason)
            else:
                record.update(clean)
                record["record_id"] = clean[ID_FIELD[self.kind]]
                checked.append((len(out), clean))
            out.append(record)
        self._check_token_lengths(out, checked)
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
    except Exception:  # noqa: BLE001 — isolate the failing user(s) below
        rows: list[dict] = []
        for user in users:
            try:
                rows += compute([user])
            except Exception as exc:  # noqa: BLE001
                rows.append(on_error(user, exc))
        return rows
