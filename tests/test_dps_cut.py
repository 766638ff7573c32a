"""`steerstore bench dps-cut`: cheaper DPS settings against the reference, on a small synthetic data set."""

import gzip
import json
import random

import pytest

from steerstore.jobs.bench.dps_cut import BenchDPSCutConfig, main, parse_variants
from steerstore.operators.runtime import ModelConfig

WORDS = "river light morning quiet garden letter winter music paper window story careful bright small".split()


def _data(folder, users=2, items=3):
    rng = random.Random(0)
    rows = []
    for u in range(users):
        texts = []
        for i in range(items):
            opening = f"User {u} wrote about the {WORDS[(u + i) % len(WORDS)]} that day in town."
            texts.append({"id": f"{u}-{i}", "text": opening + " " + " ".join(rng.choice(WORDS) for _ in range(30))})
        rows.append({"user_id": f"blog-{u}", "meta": {}, "items": texts})
    with gzip.open(folder / "blogs-dev.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows))
    return folder


def test_variants_parse_and_refuse_fewer_candidates_than_heads_kept():
    assert parse_variants("32:2, 8:0, d16:2, 16:c", 8) == [(32, 2, False), (8, 0, False), (16, 2, True),
                                                            (16, "c", False)]
    with pytest.raises(ValueError, match="the reference verifies every user"):
        parse_variants("d16:2,16:2", 8)
    with pytest.raises(ValueError, match="candidates >= top_k"):
        parse_variants("4:0", 8)
    with pytest.raises(ValueError, match="candidates:context_items"):
        parse_variants("16", 8)


def test_the_reference_agrees_with_itself_and_fewer_candidates_cost_less(tmp_path, tiny_model_folder):
    config = BenchDPSCutConfig(data_dir=str(_data(tmp_path)), users=2, items=3, words=20, top_k=2,
                               variants="8:1,2:1,8:0,8:c", json=str(tmp_path / "cut.json"),
                               model=ModelConfig(name_or_path=str(tiny_model_folder)))
    result = main(config)
    assert json.loads((tmp_path / "cut.json").read_text())["reference"] == "8:1"
    ref, fewer, no_context = (result["variants"][k] for k in ("8:1", "2:1", "8:0"))
    assert ref["top_k_overlap"] == 1.0 and ref["pcs_captured"] == 1.0 and ref["attribution_spearman"] == 1.0
    assert ref["fte_ratio_vs_reference"] == 1.0
    # same sequences: the attribution is the same, verification does less work
    assert fewer["attribution_spearman"] == 1.0 and fewer["fte_per_user"] < ref["fte_per_user"]
    assert fewer["tokens_per_user"] == ref["tokens_per_user"]
    # no context: shorter sequences, a different attribution
    assert no_context["tokens_per_user"] < ref["tokens_per_user"] and no_context["fte_per_user"] < ref["fte_per_user"]
    assert no_context["attribution_spearman"] < 1.0
    # one conversation: each token once (fewer than with context), every output scored after the earlier ones
    conversation = result["variants"]["8:c"]
    assert conversation["context_items"] == "conversation"
    assert no_context["tokens_per_user"] < conversation["tokens_per_user"] < ref["tokens_per_user"]
    assert conversation["fte_per_user"] < ref["fte_per_user"] and conversation["attribution_spearman"] < 1.0
    for v in (fewer, no_context, conversation):
        assert 0 <= v["top_k_overlap"] <= 1 and len(v["pcs_captured_per_user"]) == 2


@pytest.mark.slow
def test_a_departures_variant_serves_agreeing_users_their_clusters_heads_for_less_work(tmp_path, tiny_model_folder):
    # departure_overlap 0: every user agrees with its cluster, so no user is verified
    config = BenchDPSCutConfig(data_dir=str(_data(tmp_path, users=5)), users=2, items=3, words=20, top_k=2,
                               variants="8:1,d8:1", clusters=2, cluster_users=3, cluster_items=3,
                               departure_overlap=0.0, json="", model=ModelConfig(name_or_path=str(tiny_model_folder)))
    result = main(config)
    ref, dep = result["variants"]["8:1"], result["variants"]["d8:1"]
    assert ref["verified_share"] == 1.0 and dep["verified_share"] == 0.0
    assert dep["fte_per_user"] < ref["fte_per_user"] and dep["cluster_fte"] > 0 and dep["clusters"] == 2
    assert dep["other_users"] == 3 and all(0 <= o <= 1 for o in dep["cluster_overlap_per_user"])
    assert dep["attribution_spearman"] == 1.0  # the same sequences: the same attribution
    assert 0 <= dep["top_k_overlap"] <= 1 and len(dep["pcs_captured_per_user"]) == 2
