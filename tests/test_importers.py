"""Importers turn PRISM conversations and plain pairs into preference_pairs rows."""

import json

from jobs import cli
from schemas.inputs import validate_record


def conversation(user="u1", cid="c1"):
    return {"conversation_id": cid, "user_id": user, "conversation_history": [
        {"turn": 0, "role": "user", "content": "Hi, recommend a book."},
        {"turn": 0, "role": "model", "content": "Try Dune.", "score": 80, "if_chosen": True, "within_turn_id": 0},
        {"turn": 0, "role": "model", "content": "No.", "score": 10, "if_chosen": False, "within_turn_id": 1},
        {"turn": 0, "role": "model", "content": "Read anything.", "score": 85, "if_chosen": False, "within_turn_id": 2},
        {"turn": 1, "role": "user", "content": "Why Dune?"},
        {"turn": 1, "role": "model", "content": "Great world building.", "score": 70, "if_chosen": True,
         "within_turn_id": 0},
        {"turn": 1, "role": "model", "content": "Because.", "score": 30, "if_chosen": False, "within_turn_id": 1},
    ]}


def run(tmp_path, fmt, lines):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(lines) + "\n")
    assert cli.main(["import", "--format", fmt, "--input", str(src), "--output", str(dst)]) == 0
    pairs = [json.loads(line) for line in dst.read_text().splitlines()]
    return pairs, json.loads((tmp_path / "out.jsonl.import.json").read_text())


def test_prism_turns_become_pairs_weighted_by_score_gaps_with_earlier_turns_as_context(tmp_path):
    pairs, summary = run(tmp_path, "prism", [json.dumps(conversation()), "not json"])
    assert [(p["chosen"], p["rejected"], p["weight"]) for p in pairs] == [
        ("Try Dune.", "No.", 0.7), ("Try Dune.", "Read anything.", 0.01), ("Great world building.", "Because.", 0.4)]
    assert pairs[0]["prompt"] == "Hi, recommend a book."
    assert pairs[2]["prompt"] == "User: Hi, recommend a book.\nAssistant: Try Dune.\nUser: Why Dune?"
    assert len({p["pair_id"] for p in pairs}) == 3
    assert summary["skipped"] == {"invalid JSON line": 1} and summary["pairs"] == 3
    assert all(validate_record("preference_pairs", p)[1] is None for p in pairs)


def test_a_prism_turn_without_a_single_chosen_response_is_counted_not_imported(tmp_path):
    conv = conversation()
    for m in conv["conversation_history"][5:]:
        m["if_chosen"] = False
    pairs, summary = run(tmp_path, "prism", [json.dumps(conv)])
    assert len(pairs) == 2 and sum(summary["skipped"].values()) == 1


def test_plain_pairs_get_stable_content_ids_when_they_have_none(tmp_path):
    row = {"user_id": "u", "prompt": "p", "chosen": "a", "rejected": "b", "weight": 2}
    pairs, _ = run(tmp_path, "plain", [json.dumps(row), json.dumps(row), json.dumps({"user_id": "u"})])
    assert pairs[0]["pair_id"] == pairs[1]["pair_id"] and pairs[0]["pair_id"].startswith("h")
    assert pairs[0]["weight"] == 2 and len(pairs) == 2
