"""Synthetic demo users with clearly different, known preferences.

Two styles are contrasted on the same prompts: ``enthusiastic`` (warm, exclamatory) and
``formal`` (terse, neutral). Users of one style choose its answer over the other style's
answer, so each user's CAA direction should point towards their own style. A few bad rows
and a user with too few pairs are included so the demo shows quarantine and reconciliation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = [
    ("coffee", "a drink brewed from roasted coffee beans"),
    ("the ocean", "the large body of salt water that covers most of the Earth"),
    ("bicycles", "two-wheeled vehicles powered by pedalling"),
    ("the moon", "the natural satellite that orbits the Earth"),
    ("gardening", "growing and tending plants"),
    ("libraries", "places that lend books and other media"),
    ("rain", "water that falls from clouds"),
    ("chess", "a board game for two players"),
    ("volcanoes", "openings in the Earth's crust where lava escapes"),
    ("bread", "a food baked from flour, water and yeast"),
    ("trains", "vehicles that run on rails"),
    ("honey", "a sweet food made by bees"),
    ("mountains", "large natural elevations of the Earth's surface"),
    ("music", "sound organised in time"),
    ("snow", "frozen water that falls as flakes"),
    ("museums", "institutions that keep and show collections"),
]

PROMPTS = ["Tell me about {t}.", "What is {t}?", "Describe {t} in a sentence or two."]

ENTHUSIASTIC = [
    "Oh, I absolutely love {t}! It's {f} — how amazing is that?! Honestly, it's wonderful!",
    "Wow, {t} is fantastic! It's {f}, and I think that's incredible! So exciting!",
    "Yay, {t}! It's {f}. I adore it — truly one of the best things ever!!",
]
FORMAL = [
    "{T} is {f}.",
    "{T}: {f}. No further detail is required.",
    "Definition: {t} is {f}.",
]

DEMO_PROMPTS = ["Tell me about the weather.", "What do you think of cats?", "Describe a city park."]


def _answer(templates: list[str], rng: random.Random, topic: str, fact: str) -> str:
    return rng.choice(templates).format(t=topic, T=topic[:1].upper() + topic[1:], f=fact)


def demo_pairs(users_per_style: int = 3, pairs_per_user: int = 10, seed: int = 0) -> list[dict]:
    """Preference pairs for ``2 * users_per_style`` users plus a few bad rows and a thin user."""
    rng = random.Random(seed)
    rows: list[dict] = []
    for style in ("enthusiastic", "formal"):
        for u in range(users_per_style):
            user = f"{style}-{u}"
            for k, (topic, fact) in enumerate(rng.sample(TOPICS, pairs_per_user)):
                eager = _answer(ENTHUSIASTIC, rng, topic, fact)
                terse = _answer(FORMAL, rng, topic, fact)
                chosen, rejected = (eager, terse) if style == "enthusiastic" else (terse, eager)
                rows.append({
                    "user_id": user, "pair_id": f"{user}-{k}",
                    "prompt": rng.choice(PROMPTS).format(t=topic),
                    "chosen": chosen, "rejected": rejected, "weight": 1.0,
                })
    # a user with a single pair: quarantined as "too few pairs"
    rows.append({"user_id": "thin-user", "pair_id": "thin-0", "prompt": "What is rain?",
                 "chosen": "Rain is water that falls from clouds.", "rejected": "Rain!! I love it!!"})
    # bad rows: quarantined with a reason, the job goes on
    rows.append({"user_id": "formal-0", "pair_id": "bad-empty", "prompt": "Hi", "chosen": "", "rejected": "x"})
    rows.append({"user_id": "formal-0", "pair_id": 17, "prompt": "Hi", "chosen": "Hello.", "rejected": "Hey!!"})
    return rows


def demo_histories(users_per_style: int = 3, items_per_user: int = 4, seed: int = 1) -> list[dict]:
    """What each synthetic user wrote: answers in their own style (for the history methods)."""
    rng = random.Random(seed)
    rows: list[dict] = []
    for style, templates in (("enthusiastic", ENTHUSIASTIC), ("formal", FORMAL)):
        for u in range(users_per_style):
            user = f"{style}-{u}"
            for k, (topic, fact) in enumerate(rng.sample(TOPICS, items_per_user)):
                rows.append({"user_id": user, "item_id": f"{user}-h{k}", "input": rng.choice(PROMPTS).format(t=topic),
                             "output": _answer(templates, rng, topic, fact), "timestamp": 1_700_000_000 + 3600 * k})
    return rows


def write_demo_inputs(folder: Path, histories_per_user: int = 0, **kwargs) -> tuple[Path, Path | None]:
    """Write the demo pairs as JSONL (plus one malformed line), and histories when asked; return the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pairs.jsonl"
    with open(path, "w") as fh:
        for row in demo_pairs(**kwargs):
            fh.write(json.dumps(row) + "\n")
        fh.write('{"user_id": "enthusiastic-0", "pair_id": "broken", "prompt": \n')  # truncated line
    if not histories_per_user:
        return path, None
    hist = folder / "histories.jsonl"
    with open(hist, "w") as fh:
        for row in demo_histories(kwargs.get("users_per_style", 3), histories_per_user):
            fh.write(json.dumps(row) + "\n")
    return path, hist
