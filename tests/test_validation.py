"""Bad input rows get a clear reason and go to quarantine; users are prepared one row each."""

import json

import pyarrow as pa
import pytest

from steerstore.operators.prepare import PrepareConfig, PrepareUsers
from steerstore.operators.runtime import ModelConfig
from steerstore.operators.validate import ValidateConfig, ValidateRecords
from steerstore.schemas.inputs import validate_record
from tests.tiny import save_tiny

GOOD = {"user_id": "u1", "pair_id": "p1", "prompt": "Hi", "chosen": "Hello.", "rejected": "Yo!!", "weight": 2}


@pytest.mark.parametrize("change, reason", [
    ({"user_id": None}, "missing field 'user_id'"),
    ({"pair_id": 7}, "field 'pair_id' must be a string, got int"),
    ({"chosen": "   "}, "empty text in field 'chosen'"),
    ({"weight": "high"}, "field 'weight' must be a number"),
    ({"weight": -1}, "a number in [0, 1000], got -1.0"),
    ({"rejected": "Hello."}, "chosen and rejected are identical"),
])
def test_each_kind_of_bad_pair_gets_its_own_reason(change, reason):
    clean, why = validate_record("preference_pairs", {**GOOD, **change})
    assert clean is None and reason in why


def test_a_good_pair_is_returned_typed():
    clean, why = validate_record("preference_pairs", GOOD)
    assert why is None and clean["weight"] == 2.0 and clean["pair_id"] == "p1"


def test_history_timestamps_accept_iso_text_and_epoch_seconds_only():
    row = {"user_id": "u", "item_id": "i", "input": "a", "output": "b"}
    assert validate_record("histories", {**row, "timestamp": "2024-05-01T10:00:00Z"})[0]["timestamp"].year == 2024
    assert validate_record("histories", {**row, "timestamp": 0})[0]["timestamp"].year == 1970
    assert "not ISO-8601" in validate_record("histories", {**row, "timestamp": "yesterday"})[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"))


def test_validation_quarantines_bad_lines_and_keeps_rows_in_equal_rows_out(tiny_folder):
    validator = ValidateRecords("preference_pairs", ValidateConfig(max_tokens=40),
                                ModelConfig(name_or_path=str(tiny_folder)))
    lines = [json.dumps(GOOD), "{not json", json.dumps({**GOOD, "pair_id": "p2", "chosen": "word " * 60}),
             json.dumps([1, 2]), json.dumps({**GOOD, "pair_id": "p3", "chosen": ""})]
    out = validator(pa.table({"text": lines, "path": ["f.jsonl"] * len(lines)}))
    assert out.num_rows == len(lines)
    rows = out.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "quarantined", "quarantined", "quarantined", "quarantined"]
    assert rows[1]["reason"].startswith("invalid JSON")
    assert rows[2]["reason"].startswith("text over token limit") and rows[2]["record_id"] == "p2"
    assert "expected an object" in rows[3]["reason"]
    assert rows[4]["reason"] == "empty text in field 'chosen'"
    assert rows[0]["source"] == "f.jsonl" and rows[0]["chosen"] == "Hello."


def test_parquet_rows_are_validated_like_json_rows(tiny_folder):
    validator = ValidateRecords("preference_pairs", ValidateConfig(), ModelConfig(name_or_path=str(tiny_folder)))
    out = validator(pa.Table.from_pylist([GOOD, {**GOOD, "pair_id": "p9", "prompt": ""}]))
    assert [r["status"] for r in out.to_pylist()] == ["ok", "quarantined"]


def test_a_batch_without_the_needed_columns_names_the_operator_and_columns(tiny_folder):
    validator = ValidateRecords("preference_pairs", ValidateConfig(), ModelConfig(name_or_path=str(tiny_folder)))
    with pytest.raises(KeyError, match=r"ValidateRecords: input batch lacks columns \['user_id', 'pair_id'\]"):
        validator(pa.table({"something": [1]}))


def _records(*pairs, status="ok"):
    return pa.Table.from_pylist([
        {"kind": "preference_pairs", "source": "f", "user_id": "u1", "record_id": p["pair_id"], "status": status,
         "reason": None, "raw": json.dumps(p), "prompt": p["prompt"], "chosen": p["chosen"],
         "rejected": p["rejected"], "weight": p.get("weight")} for p in pairs])


def test_identical_duplicates_keep_one_copy_and_conflicting_ones_drop_all():
    p2 = {**GOOD, "pair_id": "p2"}
    conflict = {**GOOD, "pair_id": "p2", "chosen": "Different."}
    row = PrepareUsers(PrepareConfig(min_pairs=1))(_records(GOOD, GOOD, p2, conflict)).to_pylist()[0]
    assert [p["pair_id"] for p in row["pairs"]] == ["p1"]
    reasons = sorted(d["reason"] for d in row["dropped"])
    assert len(reasons) == 3
    assert reasons[0].startswith("duplicate pair_id 'p1' (identical copy")
    assert all("conflicting content" in r for r in reasons[1:])
    assert row["n_pairs_in"] == 4 and row["status"] == "ok"


def test_a_user_with_too_few_valid_pairs_is_quarantined_with_the_count():
    row = PrepareUsers(PrepareConfig(min_pairs=2))(_records(GOOD)).to_pylist()[0]
    assert row["status"] == "quarantined"
    assert row["reason"].startswith("user has 1 valid preference pair(s); CAA needs at least 2")


def test_the_content_fingerprint_ignores_row_order_but_not_content():
    p2 = {**GOOD, "pair_id": "p2", "prompt": "Other"}
    prep = PrepareUsers(PrepareConfig())
    a = prep(_records(GOOD, p2)).to_pylist()[0]["content_fingerprint"]
    b = prep(_records(p2, GOOD)).to_pylist()[0]["content_fingerprint"]
    c = prep(_records(GOOD, {**p2, "chosen": "Changed."})).to_pylist()[0]["content_fingerprint"]
    assert a == b != c


def test_a_batch_that_fails_is_retried_user_by_user_and_says_so(caplog):
    from steerstore.operators.validate import isolate_failures

    def compute(users):
        if len(users) > 1:
            raise MemoryError("CUDA out of memory")
        if users[0] == "bad":
            raise ValueError("bad user")
        return [{"user": users[0]}]

    with caplog.at_level("WARNING", logger="steerstore"):
        rows = isolate_failures(["a", "bad", "b"], compute, lambda u, exc: {"user": u, "error": str(exc)})
    assert rows == [{"user": "a"}, {"user": "bad", "error": "bad user"}, {"user": "b"}]
    assert "a batch of 3 users failed (MemoryError: CUDA out of memory)" in caplog.text
