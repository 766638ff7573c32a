"""SteerX stages 1–2: leave-one-out token effects (parity with a per-item reference), words, anchors, planted signal."""

import numpy as np
import pytest
import torch

from operators.history import HistoryContextConfig
from operators.steerx import SteerXConfig, loo_prompts, select_anchors, token_effects, user_anchors, word_effects

ITEMS = [{"item_id": f"i{k}", "user_id": "ann", "input": f"Tell me about thing {k}.",
          "output": text} for k, text in enumerate([
              "Wow, I absolutely love it!", "Noted. The answer is brief.", "The quick brown fox jumps.",
              "Amazing, fantastic, wonderful!"])]
POOL = [{"item_id": f"o{k}", "user_id": "bob", "input": "Hi", "output": f"Other text {k}."} for k in range(5)] + ITEMS


def _config(cf="empty", k=2, **kw):
    return SteerXConfig(counterfactual=cf, history=HistoryContextConfig(context_items=k, max_items=8), **kw)


def test_loo_prompts_hold_out_the_item_and_draw_the_counterfactual_from_other_users():
    scored = loo_prompts("ann", ITEMS, POOL, _config("other_users"))
    assert len(scored) == 4
    for item, s in zip(ITEMS, scored):
        assert item["output"] not in s["prompt"] and item["output"] == s["output"]
        assert s["prompt"].count("Response:") == 2 and s["counterfactual"].count("Response:") == 2
        assert "Other text" in s["counterfactual"] and not any(i["output"] in s["counterfactual"] for i in ITEMS)
    assert loo_prompts("ann", ITEMS, POOL, _config("other_users")) == scored  # seeded
    empty = loo_prompts("ann", ITEMS, POOL, _config("empty"))
    assert all("Response:" not in s["counterfactual"] and s["counterfactual"].endswith(i["input"])
               for s, i in zip(empty, ITEMS))
    with pytest.raises(ValueError, match="needs 2 items of other users"):
        loo_prompts("ann", ITEMS, ITEMS, _config("other_users"))


@pytest.mark.parametrize("cf", ["empty", "other_users"])
def test_batched_effects_equal_a_per_item_reference(tiny_runtime, cf):
    rt = tiny_runtime
    scored = loo_prompts("ann", ITEMS, POOL, _config(cf))
    batched = token_effects(rt, scored)

    def logp(prompt, output):  # plain reference: one sequence, batch 1, full logits
        e = rt.encode([prompt], [output])[0]
        with torch.no_grad():
            logits = rt.model(input_ids=torch.tensor([e.ids])).logits[0].float()
        lp = torch.log_softmax(logits[e.prompt_len - 1:-1], -1)
        return lp.gather(-1, torch.tensor(e.ids[e.prompt_len:])[:, None]).squeeze(-1).double().numpy()
    for s, got in zip(scored, batched):
        expected = logp(s["prompt"], s["output"]) - logp(s["counterfactual"], s["output"])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        assert np.abs(got).max() > 1e-3


def test_words_sum_their_tokens_effects(tiny_runtime):
    tok = tiny_runtime.tokenizer
    text = "Wow, I absolutely love it!"
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    words = word_effects(tok, text, np.ones(n))
    assert [w for w, _ in words] == ["Wow", "I", "absolutely", "love", "it"]
    # every token inside a word counts once; punctuation-only tokens count for no word
    assert sum(e for _, e in words) <= n and all(e >= 1 for _, e in words)
    with pytest.raises(ValueError, match="token effects"):
        word_effects(tok, text, np.ones(n + 1))


def test_anchor_selection_threshold_percentile_and_fallback():
    words = [("i1", [("Zorb", 3.0), ("the", 0.1), ("zorb", 2.0)]), ("i2", [("blip", 1.5), ("a", -0.2)])]
    anchors = select_anchors(words, SteerXConfig(tau=1.0, min_anchors=1))
    assert [(a["word"], a["count"], a["items"]) for a in anchors] == [("zorb", 2, ["i1"]), ("blip", 1, ["i2"])]
    assert anchors[0]["mean_effect"] == pytest.approx(2.5)
    assert [a["word"] for a in select_anchors(words, SteerXConfig(tau=10.0, min_anchors=2))] == ["zorb"]  # top-2 are both zorb
    top = select_anchors(words, SteerXConfig(anchor_mode="percentile", percentile=70, min_anchors=1))
    assert [a["word"] for a in top] == ["zorb"]


BOILERPLATE = "As always, thanks for reading and have a wonderful day."
MARKERS = {"ann": ["zorblax", "quindle", "mirthwood"], "ben": ["flimberry", "snorkade", "vextral"],
           "cat": ["plonkish", "grumbleton", "wispara"]}


def _planted(user):
    m = MARKERS[user]
    return [{"item_id": f"{user}{i}", "user_id": user, "input": f"Write a short note about {t}.",
             "output": f"Today {t} felt {m[i % 3]} and {m[(i + 1) % 3]}, truly {m[(i + 2) % 3]}. {BOILERPLATE}"}
            for i, t in enumerate(["the weather", "my garden", "a long walk", "dinner plans"])]


@pytest.mark.slow
def test_planted_markers_are_the_top_anchors_and_other_users_cancel_boilerplate():
    """Real default model: users share boilerplate but each has rare marker words."""
    from operators.runtime import ModelConfig, ModelRuntime

    rt = ModelRuntime(ModelConfig())
    pool = [it for u in MARKERS for it in _planted(u)]
    boiler = {"thanks", "reading", "wonderful", "always"}
    for cf in ("empty", "other_users"):
        config = _config(cf, k=2, tau=1.0)
        for user, markers in MARKERS.items():
            scored, anchors = user_anchors(rt, user, _planted(user), pool, config)
            precision = len({a["word"] for a in anchors[:3]} & set(markers)) / 3
            assert precision == 1.0, (cf, user, anchors[:5])
            effects = [e for s in scored for w, e in s["words"] if w.lower() in boiler]
            if cf == "other_users":
                assert max(abs(e) for e in effects) < 0.5, (user, effects)
            else:  # ∅ credits the user's history with boilerplate every history has
                assert np.mean(effects) > 1.0, (user, effects)


def test_the_actor_quarantines_a_user_with_one_item_and_keeps_the_batch(tiny_model_folder):
    import pyarrow as pa

    from operators.runtime import ModelConfig
    from operators.steerx import SteerXAnchors

    hist = [{k: v for k, v in it.items() if k != "user_id"} | {"timestamp": None} for it in ITEMS]
    batch = pa.Table.from_pylist([{"user_id": "ann", "histories": hist, "content_fingerprint": "a"},
                                  {"user_id": "solo", "histories": hist[:1], "content_fingerprint": "s"}])
    actor = SteerXAnchors(_config("other_users", min_anchors=2), ModelConfig(name_or_path=str(tiny_model_folder)), POOL)
    rows = actor(batch).to_pylist()
    assert [r["user_id"] for r in rows] == ["ann", "solo"]
    assert rows[0]["status"] == "ok" and rows[0]["n_items"] == 4 and len(rows[0]["anchors"]) >= 1
    assert rows[1]["status"] == "quarantined" and "at least 2 history items" in rows[1]["reason"]
