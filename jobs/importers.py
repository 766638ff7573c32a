"""Importers: turn public data into steerstore inputs.

Launch: ``steerstore import --format prism --input conversations.jsonl --output pairs.jsonl``
or ``steerstore import --format lamp --input dev_questions.json --outputs dev_outputs.json --output lamp5/``

``prism`` and ``plain`` write ``preference_pairs`` JSONL:

- ``prism``: PRISM's ``conversations.jsonl``. In each turn the model response with
  ``if_chosen: true`` is ``chosen``, and every other response of that turn is a ``rejected``.
  The weight is the score gap (1–100 scale) divided by 100, at least 0.01, because an explicit
  choice always counts a little. The prompt is the user's message; for later turns it is
  preceded by the earlier exchange ("User: … / Assistant: …", the chosen replies).
- ``plain``: JSONL with ``user_id``, ``prompt``, ``chosen``, ``rejected`` and an optional
  ``weight`` or ``pair_id``. A missing ``pair_id`` becomes a content hash, so re-imports are
  stable and duplicates stay detectable.

``lamp`` and ``longlamp`` write a folder (local or s3://) with ``histories.jsonl`` (one row per
profile item: what the user wrote, ``output``, in answer to ``input``; a ``timestamp`` where the
item has a parseable ``date``/``year``), ``heldout.jsonl`` (one row per question: the prompt
``input`` and the user's real ``target``, see ``schemas.inputs.HELDOUT_SCHEMA``) and
``import.json``. Give refresh ``<folder>/histories.jsonl`` (the folder also holds the held-out rows).

- ``lamp``: the LaMP questions file (a JSON list of ``{"id", "input", "profile": [...]}``) and,
  with ``--outputs``, the gold file (``{"task": "LaMP_5", "golds": [{"id", "output"}]}``). Every
  LaMP question carries its own profile, so each question is one user: ``user_id`` is
  ``<task>-<question id>`` (e.g. ``LaMP_5-310``). Profile items become history rows written to
  look like the task's own question prompt:
  LaMP-4 ``{text, title}`` → "Generate a headline for the following article: <text>" / title;
  LaMP-5 ``{abstract, title}`` → "Generate a title for the following abstract of a paper: <abstract>" / title;
  LaMP-6 ``{text, title}`` (Avocado-filled files only) → "Generate a subject for the following email: <text>" / title;
  LaMP-7 ``{text}`` → "Write a tweet." / text (the profile holds only the user's tweets).
  LaMP-1/2/3 are classification tasks (the gold is a label, not the user's text): not imported.
- ``longlamp``: the LongLaMP/LongLaMP Hugging Face rows (any config, ``*_user`` or ``*_temporal``)
  exported as JSONL or a JSON list, each ``{"input", "output", "profile": [...]}`` and a user
  field, which is the ``user_id``. Profile items, as the question prompt words them:
  abstract_generation (user ``name``) ``{title, abstract, year}`` → 'Generate an abstract for the
  title "<title>".' / abstract; product_review (user ``reviewerId``) ``{overall, description,
  summary, reviewText}`` → the official review prompt with rating, description and summary /
  reviewText; topic_writing (user ``author``) ``{summary, content}`` → "Generate the content for a
  reddit post <summary>" / content.

The task is detected from the question prompts (their official wording), then from the gold
file's ``task``, then from the profile items' fields; ``--task`` overrides. Item ids are the
profile item's ``id``, else its index; they are made unique per user. A question without a gold
output gives no held-out row (its profile is still imported). A profile item identical to a
held-out target of the same user is dropped (LongLaMP users may own several rows).

Rows that cannot be imported are not dropped silently: the summary counts them by reason,
and the summary is written beside the output as ``<output>.import.json`` (``import.json`` in the
output folder for lamp/longlamp).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

from steerstore.infra import storage
from steerstore.infra.config import check, option
from steerstore.infra.records import jsonl_lines
from steerstore.infra.storage import StorageConfig
from steerstore.schemas.inputs import parse_timestamp


@dataclass
class ImportConfig:
    format: Literal["prism", "plain", "lamp", "longlamp"] = option(
        "prism", help="input format: prism or plain (to preference_pairs JSONL); lamp or longlamp (to a folder "
                      "with histories.jsonl and heldout.jsonl)")
    input: str = option("", help="input file (local or s3://): JSONL for prism/plain, the questions JSON for lamp, "
                                 "the dataset rows as JSONL or a JSON list for longlamp")
    output: str = option("", help="output (local or s3://): the preference_pairs JSONL for prism/plain, a folder "
                                  "for lamp/longlamp")
    outputs: str = option("", help="lamp only: the gold outputs file ({\"task\", \"golds\": [{\"id\", \"output\"}]}); "
                                   "without it only questions that embed an \"output\" get a held-out row")
    task: str = option("", help="lamp/longlamp: the task, overriding detection: LaMP_4, LaMP_5, LaMP_6, LaMP_7, "
                                "abstract_generation, product_review or topic_writing")
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig, metadata={"help": "object storage"})

    def __post_init__(self) -> None:
        check(bool(self.input) and bool(self.output), "--input and --output are required")
        check(not self.outputs or self.format == "lamp",
              "--outputs is only for --format lamp (LongLaMP rows carry their own output)")
        check(not self.task or self.format in ("lamp", "longlamp"), "--task is only for --format lamp or longlamp")
        if self.task:
            task = _lookup(self.task)
            known = sorted(t.name for t in TASKS.values() if t.family == self.format and t.item is not None)
            check(task is not None and task.family == self.format,
                  f"--task {self.task!r} is not a {self.format} task; known: {known}")
            check(task.item is not None, f"--task {task.name} is a classification task (its gold is a label, not "
                                         f"the user's text): it cannot be imported; known: {known}")


def _lines(text: str, skipped: Counter) -> Iterator[dict]:
    for _, row, problem in jsonl_lines(text):
        if problem is None:
            yield row
        else:
            skipped["invalid JSON line" if problem.startswith("invalid JSON") else "line is not a JSON object"] += 1


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


# ----------------------------------------------------------------------------------------------
# LaMP and LongLaMP: per-user histories from the profiles, held-out rows from the questions


@dataclass(frozen=True)
class Task:
    """One LaMP/LongLaMP task: how its questions start, and how a profile item becomes (input, output)."""

    name: str
    family: str                                   # "lamp" or "longlamp"
    prefixes: tuple[str, ...]                     # official question wording, lower case
    needs: tuple[str, ...]                        # profile item fields that must hold text
    item: Callable[[dict], tuple[str, str]] | None = None   # None: a classification task (gold is a label)
    user_fields: tuple[str, ...] = ()             # LongLaMP: the row field naming the user


def _text(value: Any) -> str:
    return value if isinstance(value, str) else "" if value is None else str(value)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("LaMP_1", "lamp", ("for an author who has written the paper with the title",), ("title", "abstract")),
    Task("LaMP_2", "lamp", ("which tag does this movie relate to", "which category does this article relate to"),
         ("tag",)),
    Task("LaMP_3", "lamp", ("what is the score of the following review",), ("text", "score")),
    Task("LaMP_4", "lamp", ("generate a headline for the following article",), ("text", "title"),
         lambda p: ("Generate a headline for the following article: " + p["text"], p["title"])),
    Task("LaMP_5", "lamp", ("generate a title for the following abstract of a paper",), ("abstract", "title"),
         lambda p: ("Generate a title for the following abstract of a paper: " + p["abstract"], p["title"])),
    Task("LaMP_6", "lamp", ("generate a subject for the following email",), ("text", "title"),
         lambda p: ("Generate a subject for the following email: " + p["text"], p["title"])),
    Task("LaMP_7", "lamp", ("paraphrase the following tweet",), ("text",),
         lambda p: ("Write a tweet.", p["text"])),
    Task("abstract_generation", "longlamp", ("generate an abstract for the title",), ("title", "abstract"),
         lambda p: (f'Generate an abstract for the title "{p["title"]}".', p["abstract"]), ("name",)),
    # "has a given" is the wording of the dataset's own question prompts, kept so histories match them
    Task("product_review", "longlamp", ("generate the review text written by a reviewer",), ("reviewText",),
         lambda p: (f'Generate the review text written by a reviewer who has a given an overall rating of '
                    f'"{_text(p.get("overall"))}" for a product with description "{_text(p.get("description"))}". '
                    f'The summary of the review text is "{_text(p.get("summary"))}".', p["reviewText"]),
         ("reviewerId",)),
    Task("topic_writing", "longlamp", ("generate the content for a reddit post",), ("summary", "content"),
         lambda p: ("Generate the content for a reddit post " + p["summary"], p["content"]), ("author",)),
)}
# when the prompts do not tell: the task a profile item's fields point to (first match wins)
_BY_FIELDS = {"lamp": ("LaMP_3", "LaMP_2", "LaMP_5", "LaMP_4", "LaMP_7"),
              "longlamp": ("product_review", "topic_writing", "abstract_generation")}
# spellings accepted for --task and a gold file's "task": LaMP-5, lamp5, product_review_user, review, ...
_NAMES = {re.sub(r"[^a-z0-9]", "", name.lower()): name for name in TASKS} | {
    "abstract": "abstract_generation", "review": "product_review", "topic": "topic_writing"}
_AVOCADO_ID = re.compile(r"^\d+-\d+-EM\.txt$")   # LaMP-6 files before the Avocado texts are filled in
_GENERIC_USER_FIELDS = ("user_id", "userId", "user")
_DATE_FIELDS = ("date", "year", "timestamp", "unixReviewTime", "reviewTime")


def _lookup(name: str) -> Task | None:
    key = re.sub(r"(user|temporal)$", "", re.sub(r"[^a-z0-9]", "", name.lower()))
    return TASKS.get(_NAMES.get(key, ""))


def _records(text: str, skipped: Counter) -> list:
    """A JSON list, a datasets-server ``{"rows": [{"row": ...}]}`` page, or JSONL."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return list(_lines(text, skipped))
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        return [r["row"] if isinstance(r, dict) and isinstance(r.get("row"), dict) else r for r in data["rows"]]
    if isinstance(data, dict) and isinstance(data.get("golds"), list) and all(
            isinstance(q, dict) and "profile" in q for q in data["golds"]):
        return data["golds"]   # LaMP's Avocado script writes LaMP-6 test questions inside a gold-file wrapper
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list):
        return data
    raise ValueError(f"expected a JSON list of questions or JSONL rows, got a JSON {type(data).__name__}")


def _golds(text: str, warnings: Counter) -> tuple[dict[str, Any], str | None]:
    """LaMP gold file: ``{"task", "golds": [{"id", "output"}]}`` (or a bare list) → ({id: output}, task)."""
    data = json.loads(text)
    task = data.get("task") if isinstance(data, dict) else None
    golds = data.get("golds") if isinstance(data, dict) else data
    if not isinstance(golds, list):
        raise ValueError('the outputs file must be {"task": ..., "golds": [{"id": ..., "output": ...}]}')
    out: dict[str, Any] = {}
    for g in golds:
        if isinstance(g, dict) and g.get("id") is not None and "output" in g:
            out[str(g["id"])] = g["output"]
        else:
            warnings["gold entry without id and output (ignored)"] += 1
    return out, task if isinstance(task, str) else None


def _parse_date(value: Any) -> dt.datetime | None:
    """A profile item's date: a year, epoch seconds, ISO text ("2011", "2011-03", "2011-03-10…") or
    Amazon's "03 10, 2011". None when there is no date; ValueError when it cannot be read."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 1000 <= value <= 9999 \
            and float(value).is_integer():
        return dt.datetime(int(value), 1, 1, tzinfo=dt.timezone.utc)
    if isinstance(value, str):
        value = value.strip()
        for fmt in ("%Y", "%Y-%m", "%m %d, %Y"):
            try:
                return dt.datetime.strptime(value, fmt).replace(tzinfo=dt.timezone.utc)
            except ValueError:
                pass
    return parse_timestamp(value)  # epoch seconds, ISO-8601 text; ValueError for anything else


def _timestamp(obj: dict, warnings: Counter) -> str | None:
    for field in _DATE_FIELDS:
        if obj.get(field) not in (None, ""):
            try:
                ts = _parse_date(obj[field])
            except (ValueError, OverflowError, OSError):
                warnings[f"unreadable {field!r} (timestamp left empty)"] += 1
                return None
            return ts.isoformat() if ts else None
    return None


def _detect(family: str, questions: list, gold_task: str | None) -> tuple[Task | None, str]:
    """The task: from the official wording of the question prompts, the gold file, or profile fields."""
    votes: Counter = Counter()
    for q in questions[:500]:
        inp = q.get("input") if isinstance(q, dict) else None
        if not isinstance(inp, str):
            continue
        low = inp.strip().lower()
        for t in TASKS.values():
            if t.family == family and low.startswith(t.prefixes):
                votes[t.name] += 1
                break
        else:
            if family == "lamp" and _AVOCADO_ID.match(inp.strip()):
                votes["LaMP_6"] += 1
    if votes:
        return TASKS[votes.most_common(1)[0][0]], "question prompts"
    if gold_task and _lookup(gold_task) is not None and _lookup(gold_task).family == family:
        return _lookup(gold_task), "outputs file"
    for q in questions[:500]:
        profile = q.get("profile") if isinstance(q, dict) else None
        for p in profile if isinstance(profile, list) else ():
            if isinstance(p, dict):
                for name in _BY_FIELDS[family]:
                    if all(p.get(f) not in (None, "") for f in TASKS[name].needs):
                        votes[name] += 1
                        break
    if votes:
        return TASKS[votes.most_common(1)[0][0]], "profile fields"
    return None, "not detected"


def _history_row(task: Task, p: Any, user: str, item_id: str, skipped: Counter, warnings: Counter) -> dict | None:
    if not isinstance(p, dict):
        skipped["profile item is not a JSON object"] += 1
        return None
    missing = [f for f in task.needs if not isinstance(p.get(f), str)]
    if missing:
        skipped[f"profile item without text field(s) {', '.join(missing)} (unknown shape for {task.name})"] += 1
        return None
    if any(not p[f].strip() for f in task.needs):
        skipped["profile item with empty text"] += 1
        return None
    assert task.item is not None
    inp, out = task.item(p)
    row = {"user_id": user, "item_id": item_id, "input": inp, "output": out}
    ts = _timestamp(p, warnings)
    if ts:
        row["timestamp"] = ts
    return row


def _user(task: Task, q: dict) -> str | None:
    for field in task.user_fields + _GENERIC_USER_FIELDS:
        value = q.get(field)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            return str(value)
    return None


def benchmark_rows(family: str, questions: list, golds: dict[str, Any] | None, task: Task, skipped: Counter,
                   warnings: Counter) -> tuple[list[dict], list[dict]]:
    """(histories, heldout) rows from LaMP questions (+ golds) or LongLaMP rows."""
    histories: list[dict] = []
    heldout: list[dict] = []
    for i, q in enumerate(questions):
        if not isinstance(q, dict):
            skipped["question is not a JSON object"] += 1
            continue
        qid = q.get("id")
        qid = str(qid) if isinstance(qid, (str, int)) and not isinstance(qid, bool) and str(qid) else None
        if family == "lamp":
            if qid is None:
                skipped["question without an id"] += 1
                continue
            user, held_id = f"{task.name}-{qid}", qid
        else:
            user = _user(task, q)
            if user is None:
                skipped[f"row without a user field ({', '.join(task.user_fields + _GENERIC_USER_FIELDS)})"] += 1
                continue
            held_id = qid if qid is not None else f"row{i}"
        if task.item is None:
            skipped[f"{task.name} is a classification task (its gold is a label, not the user's text)"] += 1
            continue
        profile = q.get("profile")
        if not isinstance(profile, list):
            skipped["question without a profile list (no history rows)"] += 1
            profile = []
        for j, p in enumerate(profile):
            pid = p.get("id") if isinstance(p, dict) else None
            item_id = str(pid) if isinstance(pid, (str, int)) and not isinstance(pid, bool) and str(pid) != "" \
                else (str(j) if family == "lamp" else f"{held_id}-{j}")
            row = _history_row(task, p, user, item_id, skipped, warnings)
            if row:
                histories.append(row)
        # LaMP golds come from the outputs file (some re-exports embed "output"); LongLaMP rows embed it
        gold = golds[qid] if family == "lamp" and golds is not None and qid in golds else q.get("output")
        inp = q.get("input")
        if gold is None:
            skipped["question without a gold output (no held-out row)"] += 1
        elif not isinstance(gold, str) or not gold.strip():
            skipped["question with an empty or non-text gold output (no held-out row)"] += 1
        elif not isinstance(inp, str) or not inp.strip():
            skipped["question without input text (no held-out row)"] += 1
        else:
            row = {"user_id": user, "item_id": held_id, "input": inp, "target": gold}
            ts = _timestamp(q, warnings)
            if ts:
                row["timestamp"] = ts
            heldout.append(row)
    return _unique(histories, heldout, skipped, warnings)


def _unique(histories: list[dict], heldout: list[dict], skipped: Counter,
            warnings: Counter) -> tuple[list[dict], list[dict]]:
    """Item ids unique per user; no duplicate history text; no history item equal to a held-out target."""
    targets: dict[str, set[str]] = defaultdict(set)
    held_ids: dict[str, set[str]] = defaultdict(set)
    for h in heldout:
        h["item_id"] = _fresh(h["item_id"], held_ids[h["user_id"]], warnings, "held-out")
        targets[h["user_id"]].add(h["target"].strip())
    ids: dict[str, set[str]] = defaultdict(set)
    texts: dict[str, set[tuple[str, str]]] = defaultdict(set)
    kept = []
    for r in histories:
        user = r["user_id"]
        if r["output"].strip() in targets[user]:
            skipped["profile item equal to a held-out target of the same user"] += 1
            continue
        if (r["input"], r["output"]) in texts[user]:
            skipped["duplicate profile item (same text) of the same user"] += 1
            continue
        texts[user].add((r["input"], r["output"]))
        r["item_id"] = _fresh(r["item_id"], ids[user], warnings, "profile")
        kept.append(r)
    return kept, heldout


def _fresh(item_id: str, taken: set[str], warnings: Counter, what: str) -> str:
    new, n = item_id, 2
    while new in taken:
        new, n = f"{item_id}~{n}", n + 1
    if new != item_id:
        warnings[f"{what} item id repeated for a user (renamed with ~N)"] += 1
    taken.add(new)
    return new


def import_benchmark(config: ImportConfig) -> dict:
    skipped: Counter = Counter()
    warnings: Counter = Counter()
    questions = _records(storage.read_text(config.input, config.storage), skipped)
    golds, gold_task = None, None
    if config.outputs:
        golds, gold_task = _golds(storage.read_text(config.outputs, config.storage), warnings)
    if config.task:
        task, source = _lookup(config.task), "--task"
        detected, _ = _detect(config.format, questions, gold_task)
        if detected is not None and task is not None and detected.name != task.name:
            warnings[f"--task {task.name} overrides the detected {detected.name}"] += 1
    else:
        task, source = _detect(config.format, questions, gold_task)
    if gold_task and task is not None and _lookup(gold_task) is not task:
        warnings[f"the outputs file says task {gold_task!r}, importing as {task.name}"] += 1
    if task is None:
        skipped["question of an undetected task (no known prompt wording or profile fields; set --task)"] += \
            len(questions)
        histories, heldout = [], []
    else:
        histories, heldout = benchmark_rows(config.format, questions, golds, task, skipped, warnings)
    if golds is not None:
        qids = {str(q.get("id")) for q in questions if isinstance(q, dict)}
        if extra := sum(1 for g in golds if g not in qids):
            warnings["gold output without a question (ignored)"] += extra
    paths = {name: storage.join(config.output, name) for name in ("histories.jsonl", "heldout.jsonl", "import.json")}
    for name, rows in (("histories.jsonl", histories), ("heldout.jsonl", heldout)):
        storage.write_text(paths[name], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                           config.storage)
    summary = {"format": config.format, "task": task.name if task else None, "task_from": source,
               "input": config.input, "outputs": config.outputs or None, "output": config.output,
               "histories": len(histories), "heldout": len(heldout),
               "users": len({r["user_id"] for r in histories} | {r["user_id"] for r in heldout}),
               "users_with_heldout": len({r["user_id"] for r in heldout}),
               "histories_with_timestamp": sum(1 for r in histories if "timestamp" in r),
               "files": {"histories": paths["histories.jsonl"], "heldout": paths["heldout.jsonl"]},
               "skipped": dict(skipped), "warnings": dict(warnings)}
    storage.write_text(paths["import.json"], json.dumps(summary, indent=2), config.storage)
    print(json.dumps(summary, indent=2))
    return summary


def main(config: ImportConfig) -> dict:
    if config.format in ("lamp", "longlamp"):
        return import_benchmark(config)
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
