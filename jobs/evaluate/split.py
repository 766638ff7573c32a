"""Step 1 of the evaluation: read the inputs and split them per user into training and held-out parts.

Nothing the refresh fits may see a held-out target, so the split is made here, before the
refresh, and an existing store is accepted only when it was refreshed on exactly this split.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

from steerstore.infra import storage
from steerstore.infra.reader import StoreReader
from steerstore.infra.records import read_records
from steerstore.infra.storage import StorageConfig
from steerstore.jobs import devdata
from steerstore.jobs.evaluate.config import EvalDataConfig
from steerstore.schemas.inputs import validate_record


def dev_histories(data: EvalDataConfig) -> list[dict]:
    """History rows from the development data: input = the opening as a task, output = the continuation."""
    rows = []
    for source in data.dev_sources:
        users = devdata.read_users(data.dev_dir, source)
        taken = 0
        for user in users:
            if not devdata.in_partition(user["user_id"], data.dev_partition):
                continue
            items = []
            for item in user["items"]:
                split = devdata.split_opening(item["text"], data.dev_words)
                if split:
                    items.append({"user_id": user["user_id"], "item_id": item["id"],
                                  "input": devdata.PROMPT.format(opening=split[0]), "output": split[1],
                                  "timestamp": _dev_date(item.get("date")), "source": source})
            if len(items) >= data.min_history + data.heldout_items:
                rows.extend(items)
                taken += 1
            if taken == data.dev_users:
                break
    return rows


def _dev_date(value: str | None) -> str | None:
    """Blog dates like '12,December,2003' as ISO dates (None when absent or unparseable)."""
    if not value:
        return None
    try:
        return dt.datetime.strptime(value, "%d,%B,%Y").replace(tzinfo=dt.timezone.utc).isoformat()
    except ValueError:
        return None


@dataclass
class Split:
    train: dict[str, list[dict]]  # user -> training history items, oldest first
    heldout: list[dict]  # user_id, item_id, input, target
    train_pairs: list[dict]
    heldout_pairs: list[dict]
    notes: dict  # how each part was made, counts of skipped rows by reason
    built_pairs: bool = False  # pairs were built from the histories (their rejected side may be replaced)
    sources: dict[str, str] = dataclasses.field(default_factory=dict)  # user -> data source, where rows name one


def _clean_histories(rows: list[dict], skipped: Counter) -> dict[str, list[dict]]:
    by_user: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        clean, reason = validate_record("histories", row)
        if clean is None:
            skipped[f"history row: {reason}"] += 1
            continue
        by_user[clean["user_id"]].append(clean)
    return by_user


def _order(items: list[dict], user: str, mode: str, seed: int) -> tuple[list[dict], str]:
    """Items oldest first when every item has a timestamp (and mode is time), else a seeded order."""
    if mode == "time" and all(i.get("timestamp") is not None for i in items):
        return sorted(items, key=lambda i: (i["timestamp"], i["item_id"])), "time"
    shuffled = sorted(items, key=lambda i: i["item_id"])
    random.Random(f"{seed}:{user}").shuffle(shuffled)
    return shuffled, "seeded"


def split_data(config: EvalDataConfig, cfg: StorageConfig) -> Split:
    skipped: Counter = Counter()
    rows = read_records(config.histories, cfg) if config.histories else dev_histories(config)
    # a history row may name its source (data set, product...): built pairs stay within one source
    sources = {r["user_id"]: r["source"] for r in rows if isinstance(r, dict) and isinstance(r.get("source"), str)
               and isinstance(r.get("user_id"), str)}
    by_user = _clean_histories(rows, skipped)
    train: dict[str, list[dict]] = {}
    heldout: list[dict] = []
    modes: dict[str, int] = defaultdict(int)
    too_few: list[str] = []
    if config.heldout:
        given: dict[str, list[dict]] = defaultdict(list)
        for row in read_records(config.heldout, cfg):
            if not all(isinstance(row.get(f), str) and row[f].strip() for f in ("user_id", "item_id", "input", "target")):
                skipped["held-out row without non-empty user_id, item_id, input and target"] += 1
                continue
            given[row["user_id"]].append({k: row[k] for k in ("user_id", "item_id", "input", "target")})
        for user in sorted(given):
            items, mode = _order(by_user.get(user, []), user, config.split, config.seed)
            if len(items) < config.min_history:
                too_few.append(user)
                continue
            modes[mode] += 1
            train[user] = items[-config.max_history:]
            heldout.extend(given[user])
    else:
        for user in sorted(by_user):
            items, mode = _order(by_user[user], user, config.split, config.seed)
            if len(items) < config.min_history + config.heldout_items:
                too_few.append(user)
                continue
            modes[mode] += 1
            train[user] = items[: -config.heldout_items][-config.max_history:]
            heldout.extend({"user_id": user, "item_id": i["item_id"], "input": i["input"], "target": i["output"]}
                           for i in items[-config.heldout_items:])
    leaks = _Targets(heldout)
    for user in list(train):  # a history item that is (or holds) a held-out target never trains
        kept = [i for i in train[user] if not leaks.held(user, i["item_id"], i["output"])]
        skipped["history item held out (its id or text is a held-out target)"] += len(train[user]) - len(kept)
        train[user] = kept
        if len(kept) < config.min_history:
            too_few.append(user)
            del train[user]
    heldout = [h for h in heldout if h["user_id"] in train]
    if len(train) < 2:
        raise ValueError(f"only {len(train)} users have >= {config.min_history} training items and a held-out item; "
                         "the evaluation needs at least 2 (lower data.min_history or add data)")
    if config.preference_pairs:
        train_pairs, heldout_pairs = _split_pairs(read_records(config.preference_pairs, cfg), set(train), config, skipped)
        kept = [p for p in train_pairs if not (leaks.held_text(p["chosen"]) or leaks.held_text(p["rejected"]))]
        skipped["training pair holding a held-out target"] += len(train_pairs) - len(kept)
        train_pairs = kept
        pairs_from = config.preference_pairs
    else:
        train_pairs, heldout_pairs = _built_pairs(train, heldout, config.seed, sources)
        pairs_from = ("built from the histories: (input, the user's output, another user's output for another "
                      "input, from a user of the same source)")
    skipped = Counter({k: v for k, v in skipped.items() if v})
    notes = {"histories": config.histories or (
                 f"development data {config.dev_sources} in {config.dev_dir}, partition '{config.dev_partition}'"
                 + (" (disjoint from the 'tune' users the defaults, e.g. SteerX's τ, were chosen on)"
                    if config.dev_partition == "eval" else "")),
             "heldout": config.heldout or f"last {config.heldout_items} items per user ({config.split} split)",
             "split_modes": dict(modes), "users_with_too_few_items": too_few, "skipped_rows": dict(skipped),
             "pairs": pairs_from}
    return Split(train, heldout, train_pairs, heldout_pairs, notes, built_pairs=not config.preference_pairs,
                 sources={u: s for u, s in sources.items() if u in train})


def _normal(text: str) -> str:
    return " ".join(text.split()).casefold()


class _Targets:
    """The held-out targets, to keep them out of everything the refresh fits (every user's: the population
    statistics see all users). A training text leaks when it equals a target (whitespace and case aside)
    or contains one of at least ``MIN_CONTAINED`` characters."""

    MIN_CONTAINED = 32

    def __init__(self, heldout: list[dict]):
        self.items = {(h["user_id"], h["item_id"]) for h in heldout}
        self.texts = {_normal(h["target"]) for h in heldout}
        self.long = [t for t in self.texts if len(t) >= self.MIN_CONTAINED]

    def held_text(self, text: str) -> bool:
        text = _normal(text)
        return text in self.texts or any(t in text for t in self.long)

    def held(self, user: str, item_id: str, text: str) -> bool:
        return (user, item_id) in self.items or self.held_text(text)


def _split_pairs(rows: list[dict], users: set[str], config: EvalDataConfig, skipped: Counter) -> tuple[list, list]:
    by_user: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        clean, reason = validate_record("preference_pairs", row)
        if clean is None:
            skipped[f"pair row: {reason}"] += 1
        elif clean["user_id"] in users:
            by_user[clean["user_id"]].append(clean)
    train, held = [], []
    for user in sorted(by_user):
        pairs = sorted(by_user[user], key=lambda p: p["pair_id"])
        random.Random(f"{config.seed}:pairs:{user}").shuffle(pairs)
        cut = len(pairs) - config.heldout_pairs if len(pairs) > config.heldout_pairs else len(pairs)  # else all train
        train.extend(pairs[:cut])
        held.extend(pairs[cut:])
    return train, held


def _built_pairs(train: dict[str, list[dict]], heldout: list[dict], seed: int,
                 sources: dict[str, str] | None = None) -> tuple[list, list]:
    """Training pairs from training items, held-out pairs from held-out items.

    The rejected side is another user's text, from a user of the same source (so a pair does not
    reward telling one data set from another); a source with a single user draws from all users.
    ``with_neutral_rejected`` later replaces it with the model's own answer to the same prompt.
    """
    rng = random.Random(f"{seed}:built-pairs")
    sources = sources or {}

    def peers(user: str, pool) -> list[str]:
        others = [o for o in pool if o != user]
        same = [o for o in others if sources.get(o) == sources.get(user)]
        return same or others

    users = sorted(train)
    train_pairs = []
    for user in users:
        others = peers(user, users)
        for item in train[user]:
            other = rng.choice(train[rng.choice(others)])
            train_pairs.append({"user_id": user, "pair_id": f"{item['item_id']}-pair", "prompt": item["input"],
                                "chosen": item["output"], "rejected": other["output"], "weight": 1.0})
    held_by_user = defaultdict(list)
    for h in heldout:
        held_by_user[h["user_id"]].append(h)
    heldout_pairs = []
    for h in heldout:
        others = peers(h["user_id"], list(held_by_user))
        other = rng.choice(held_by_user[rng.choice(others)])
        heldout_pairs.append({"user_id": h["user_id"], "pair_id": f"{h['item_id']}-heldout-pair", "prompt": h["input"],
                              "chosen": h["target"], "rejected": other["target"], "weight": 1.0})
    return train_pairs, heldout_pairs


def with_neutral_rejected(split: Split, generate, max_new_tokens: int, keep_other: bool = False) -> Split:
    """Built pairs whose rejected side is the model's own greedy answer to the same prompt.

    ``generate(prompts, max_new_tokens) -> texts`` is the unsteered model (each distinct prompt
    once). A pair then contrasts the user's text with what the model writes without them for
    the same prompt: style, not topic or source. A prompt whose answer is empty keeps its
    other-user rejected text (counted in the notes). ``keep_other``: each held-out item keeps its
    other-user pair too (``rejected_kind`` other_user), beside the neutral one (training pairs are
    neutral either way).
    """
    if not split.built_pairs:
        return split
    prompts = list(dict.fromkeys(p["prompt"] for p in split.train_pairs + split.heldout_pairs))
    answers = dict(zip(prompts, generate(prompts, max_new_tokens)))
    kept = 0

    def swap(pairs: list[dict], tag: bool) -> list[dict]:
        nonlocal kept
        out = []
        for p in pairs:
            neutral = answers[p["prompt"]].strip()
            kept += not neutral
            out.append(dict(p, rejected=neutral, **({"rejected_kind": "neutral"} if tag else {})) if neutral
                       else dict(p, **({"rejected_kind": "other_user"} if tag else {})))
        return out

    # the held-out pairs say what their rejected side is (the training pairs go to the refresh as they are)
    train_pairs, heldout_pairs = swap(split.train_pairs, False), swap(split.heldout_pairs, True)
    if keep_other:
        heldout_pairs += [dict(p, pair_id=f"{p['pair_id']}-other", rejected_kind="other_user")
                          for p in split.heldout_pairs]
    notes = dict(split.notes, pairs=(f"built from the histories: (input, the user's output, the model's own greedy "
                                     f"answer to the same input, {max_new_tokens} new tokens)"
                                     + (f"; {kept} pairs with an empty answer kept another user's text" if kept else "")))
    return dataclasses.replace(split, train_pairs=train_pairs, heldout_pairs=heldout_pairs, notes=notes)


def _check_store_inputs(reader: StoreReader, texts: dict[str, str], cfg: StorageConfig) -> dict[str, str]:
    """The store version's training inputs, refusing a version refreshed on anything but this split."""
    recorded = reader.manifest.get("inputs", {})
    uris = {"histories": recorded.get("histories"), "pairs": recorded.get("preference_pairs")}
    for kind, uri in uris.items():
        try:
            same = bool(uri) and storage.read_text(uri, cfg) == texts[kind]
        except FileNotFoundError:
            same = False
        if not same:
            raise ValueError(
                f"store version {reader.version} was refreshed on training {kind} {uri!r} that are not this "
                "evaluation's training split (missing, or different items): its artifacts may have seen held-out "
                "targets. Run eval without --store to refresh on the split, or use the same --data settings and "
                "--out as the run that built it (with data.pair_rejected neutral, the rejected texts are the "
                "model's greedy answers, regenerated: the same model, dtype and max_batch_tokens are needed)")
    return uris
