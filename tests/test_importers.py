"""Importers turn PRISM conversations and plain pairs into preference_pairs rows, and LaMP/LongLaMP
question files into histories and held-out rows."""

import json

import pytest

from steerstore.jobs import cli
from steerstore.schemas.inputs import validate_record


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


# ---------------------------------------------------------------------------------------------
# LaMP / LongLaMP: histories.jsonl + heldout.jsonl in an output folder

LAMP5_PROMPT = "Generate a title for the following abstract of a paper: "


def lamp5_questions():
    """Two LaMP-5 questions in the official shape (a JSON list of {id, input, profile})."""
    fast = {"title": "Fast sparse codes", "abstract": "We make sparse codes fast.", "id": "3100", "date": "2011-03-10"}
    return [
        {"id": "310", "input": LAMP5_PROMPT + "We study sparse steering.", "profile": [
            fast,
            {"title": "Slow dense codes", "abstract": "Dense codes are slow.", "id": "3101", "date": 2013},
            {"title": "", "abstract": "An abstract without its title.", "id": "3102"},
            {"text": "a tweet, not a paper", "id": "3103"},
            {"title": "No id here", "abstract": "This item has no id."},
            {"title": "Fast sparse codes II", "abstract": "Same id, other paper.", "id": "3100"},
            dict(fast),    # the same item twice
        ]},
        {"id": 311, "input": LAMP5_PROMPT + "Nothing to see.", "profile": [
            {"title": "Only paper", "abstract": "The only abstract.", "id": "3110", "date": "sometime"}]},
    ]


def run_benchmark(tmp_path, fmt, questions_text, outputs=None, extra=()):
    src, dst = tmp_path / "questions.json", tmp_path / "out" / "folder"
    src.write_text(questions_text)
    argv = ["import", "--format", fmt, "--input", str(src), "--output", str(dst), *extra]
    if outputs is not None:
        (tmp_path / "outputs.json").write_text(json.dumps(outputs))
        argv += ["--outputs", str(tmp_path / "outputs.json")]
    assert cli.main(argv) == 0
    def read(name):
        return [json.loads(line) for line in (dst / name).read_text().splitlines()]

    return read("histories.jsonl"), read("heldout.jsonl"), json.loads((dst / "import.json").read_text())


def test_lamp_questions_and_golds_become_per_question_users_with_histories_and_heldout_rows(tmp_path):
    golds = {"task": "LaMP_5", "golds": [{"id": "310", "output": "Sparse steering"}, {"id": "999", "output": "x"}]}
    hist, held, summary = run_benchmark(tmp_path, "lamp", json.dumps(lamp5_questions()), golds)
    assert summary["task"] == "LaMP_5" and summary["task_from"] == "question prompts"
    by_id = {(h["user_id"], h["item_id"]): h for h in hist}
    assert sorted(by_id) == [("LaMP_5-310", "3100"), ("LaMP_5-310", "3100~2"), ("LaMP_5-310", "3101"),
                             ("LaMP_5-310", "4"), ("LaMP_5-311", "3110")]
    first = by_id["LaMP_5-310", "3100"]
    assert first["input"] == LAMP5_PROMPT + "We make sparse codes fast." and first["output"] == "Fast sparse codes"
    assert first["timestamp"] == "2011-03-10T00:00:00+00:00"
    assert by_id["LaMP_5-310", "3101"]["timestamp"] == "2013-01-01T00:00:00+00:00"   # a bare year
    assert "timestamp" not in by_id["LaMP_5-311", "3110"]                             # unreadable date: no timestamp
    assert held == [{"user_id": "LaMP_5-310", "item_id": "310", "input": LAMP5_PROMPT + "We study sparse steering.",
                     "target": "Sparse steering"}]
    assert summary["skipped"] == {
        "profile item with empty text": 1,
        "profile item without text field(s) abstract, title (unknown shape for LaMP_5)": 1,
        "duplicate profile item (same text) of the same user": 1,
        "question without a gold output (no held-out row)": 1}
    assert summary["warnings"] == {"unreadable 'date' (timestamp left empty)": 1,
                                   "profile item id repeated for a user (renamed with ~N)": 1,
                                   "gold output without a question (ignored)": 1}
    assert (summary["histories"], summary["heldout"], summary["users"], summary["users_with_heldout"]) == (5, 1, 2, 1)
    assert all(validate_record("histories", h)[1] is None for h in hist)


def test_lamp_without_gold_file_keeps_histories_and_counts_every_question(tmp_path):
    hist, held, summary = run_benchmark(tmp_path, "lamp", json.dumps(lamp5_questions()))
    assert held == [] and len(hist) == 5
    assert summary["skipped"]["question without a gold output (no held-out row)"] == 2


def test_lamp_task_from_profile_fields_and_override(tmp_path):
    questions = [{"id": "7", "input": "Headline please: markets rose.", "profile": [
        {"text": "Stocks fell sharply today.", "title": "Stocks fall", "id": "70"}]}]
    hist, held, summary = run_benchmark(tmp_path, "lamp", json.dumps(questions),
                                        {"task": "LaMP_4", "golds": [{"id": "7", "output": "Markets rise"}]})
    assert summary["task"] == "LaMP_4" and summary["task_from"] == "outputs file"
    assert hist[0]["user_id"] == "LaMP_4-7"
    assert hist[0]["input"] == "Generate a headline for the following article: Stocks fell sharply today."
    assert held[0]["target"] == "Markets rise"
    # LaMP-7: the profile holds only the user's tweets; --task names the task explicitly
    tweets = [{"id": "600", "input": "Paraphrase the following tweet without any explanation before or after it: "
               "I like tea.", "profile": [{"text": "tea time again ..", "id": "6000"}]}]
    hist, held, summary = run_benchmark(tmp_path, "lamp", json.dumps(tweets),
                                        {"task": "LaMP_7", "golds": [{"id": "600", "output": "tea is nice .."}]},
                                        ["--task", "lamp-7"])
    assert summary["task_from"] == "--task" and hist[0]["output"] == "tea time again .."
    assert hist[0]["user_id"] == "LaMP_7-600" and held[0]["target"] == "tea is nice .."


def test_undetectable_lamp_questions_are_counted_not_fatal(tmp_path):
    questions = [{"id": "1", "input": "Do something.", "profile": [{"foo": "bar"}]}]
    hist, held, summary = run_benchmark(tmp_path, "lamp", json.dumps(questions))
    assert hist == held == [] and summary["task"] is None
    assert sum(summary["skipped"].values()) == 1


def test_longlamp_abstract_rows_as_jsonl(tmp_path):
    rows = [
        {"name": "Ada Lovelace", "input": 'Generate an abstract for the title "Engines" using the following items: '
         "1. gears", "output": "We describe analytical engines.", "profile": [
            {"title": "Notes", "abstract": "Notes on the engine.", "id": "a1", "year": 1843},
            {"title": "Bernoulli numbers", "abstract": "  ", "id": "a2", "year": 1843},
            {"headline": "not an abstract item", "id": "a3"}]},
        {"name": "Charles Babbage", "input": 'Generate an abstract for the title "Tables"', "output": "",
         "profile": [{"title": "Difference engine", "abstract": "We tabulate.", "year": "1822"}]},
    ]
    hist, held, summary = run_benchmark(tmp_path, "longlamp", "\n".join(json.dumps(r) for r in rows) + "\n")
    assert summary["task"] == "abstract_generation"
    assert hist == [
        {"user_id": "Ada Lovelace", "item_id": "a1", "input": 'Generate an abstract for the title "Notes".',
         "output": "Notes on the engine.", "timestamp": "1843-01-01T00:00:00+00:00"},
        {"user_id": "Charles Babbage", "item_id": "row1-0", "input": 'Generate an abstract for the title '
         '"Difference engine".', "output": "We tabulate.", "timestamp": "1822-01-01T00:00:00+00:00"}]
    assert held == [{"user_id": "Ada Lovelace", "item_id": "row0", "input": rows[0]["input"],
                     "target": "We describe analytical engines."}]
    assert summary["skipped"] == {
        "profile item with empty text": 1,
        "profile item without text field(s) title, abstract (unknown shape for abstract_generation)": 1,
        "question with an empty or non-text gold output (no held-out row)": 1}


def test_longlamp_product_reviews_as_json_list_with_a_user_on_several_rows(tmp_path):
    prompt = ('Generate the review text written by a reviewer who has a given an overall rating of "{}" for a '
              'product with description "{}". The summary of the review text is "{}".')
    mug = {"overall": 4.0, "description": "A mug", "summary": "Nice mug", "reviewText": "Holds tea well."}
    rows = [
        {"reviewerId": "A1", "input": prompt.format("5.0", "A kettle", "Great"), "output": "Boils fast, love it.",
         "profile": [mug, {"overall": 1.0, "summary": "meh"}]},
        # the same reviewer again: the first row's target and the mug review reappear in this profile
        {"reviewerId": "A1", "input": prompt.format("4.0", "A mug", "Nice mug"), "output": "Holds tea well!",
         "profile": [mug, {"overall": 5.0, "description": "A kettle", "summary": "Great",
                           "reviewText": "Boils fast, love it."}]},
        {"input": prompt.format("3.0", "A pan", "ok"), "output": "It is a pan.", "profile": []},
    ]
    hist, held, summary = run_benchmark(tmp_path, "longlamp", json.dumps(rows))
    assert summary["task"] == "product_review"
    assert hist == [{"user_id": "A1", "item_id": "row0-0", "input": prompt.format("4.0", "A mug", "Nice mug"),
                     "output": "Holds tea well."}]
    assert [(h["user_id"], h["item_id"], h["target"]) for h in held] == [
        ("A1", "row0", "Boils fast, love it."), ("A1", "row1", "Holds tea well!")]
    assert held[1]["input"] == rows[1]["input"]
    assert summary["skipped"] == {
        "profile item without text field(s) reviewText (unknown shape for product_review)": 1,
        "duplicate profile item (same text) of the same user": 1,
        "profile item equal to a held-out target of the same user": 1,
        "row without a user field (reviewerId, user_id, userId, user)": 1}


def test_longlamp_topic_rows_from_a_datasets_server_page(tmp_path):
    row = {"author": "u/tea", "input": "Generate the content for a reddit post Best tea?", "output": "Oolong, always.",
           "profile": [{"summary": "Kettle advice", "content": "Get one with a gooseneck.", "id": "t1"}]}
    page = {"rows": [{"row_idx": 0, "row": row, "truncated_cells": []}]}
    hist, held, summary = run_benchmark(tmp_path, "longlamp", json.dumps(page))
    assert summary["task"] == "topic_writing" and summary["skipped"] == {}
    assert hist == [{"user_id": "u/tea", "item_id": "t1", "input": "Generate the content for a reddit post Kettle "
                     "advice", "output": "Get one with a gooseneck."}]
    assert held[0]["target"] == "Oolong, always."


@pytest.mark.slow
def test_benchmark_import_writes_into_an_s3_folder(tmp_path):
    from steerstore.infra import storage
    from steerstore.jobs.importers import ImportConfig, main
    from tests.s3server import S3Server

    src = tmp_path / "questions.json"
    src.write_text(json.dumps(lamp5_questions()))
    with S3Server() as server:
        server.create_bucket("bench")
        cfg = server.storage_config()
        summary = main(ImportConfig(format="lamp", input=str(src), output="s3://bench/lamp5/", storage=cfg))
        assert storage.list_dir("s3://bench/lamp5", cfg) == ["heldout.jsonl", "histories.jsonl", "import.json"]
        assert len(storage.read_text("s3://bench/lamp5/histories.jsonl", cfg).splitlines()) == summary["histories"] == 5


def test_benchmark_option_checks(tmp_path):
    src = tmp_path / "q.json"
    src.write_text("[]")
    base = ["import", "--input", str(src), "--output", str(tmp_path / "o")]
    assert cli.main(base + ["--format", "longlamp", "--outputs", str(src)]) == 2      # LongLaMP rows carry output
    assert cli.main(base + ["--format", "lamp", "--task", "LaMP_1"]) == 2            # classification: no user text
    assert cli.main(base + ["--format", "lamp", "--task", "topic_writing"]) == 2     # a LongLaMP task
    assert cli.main(base + ["--format", "plain", "--task", "LaMP_5"]) == 2
    assert cli.main(base + ["--format", "longlamp", "--task", "topic_writing_user"]) == 0
