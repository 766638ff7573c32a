"""Per-user preference accuracy on real development data (skipped when ../shared/data is absent)."""

import json
from pathlib import Path

import pytest

from steerstore.jobs.bench import pref_accuracy as pref_eval

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (DATA / "blogs-dev.jsonl.gz").exists(),
    reason=f"development data not found at {DATA} (it is shared beside the checkout, not part of the repo)")]


def small_config(tmp_path):
    from steerstore.infra.config import from_dict

    return from_dict(pref_eval.PrefEvalConfig, {
        "data_dir": str(DATA), "sources": ["blogs"], "users": 3, "train_pairs": 3, "heldout_pairs": 1,
        "words": 20, "out": str(tmp_path), "json": str(tmp_path / "figures.json"), "scale": {"sample_pairs": 3, "grid": [1.0, 2.0]},
        "ray": {"progress_bars": False}})


def test_held_out_pairs_never_reach_the_refresh_job():
    cfg = pref_eval.PrefEvalConfig(data_dir=str(DATA), sources=["blogs"], users=4, train_pairs=3, heldout_pairs=2)
    train, heldout = pref_eval.build_pairs(cfg)
    assert len(train) == 12 and len(heldout) == 8
    assert not {p["pair_id"] for p in train} & {p["pair_id"] for p in heldout}
    assert not {p["chosen"] for p in train} & {p["chosen"] for p in heldout}
    assert all(p["chosen"] != p["rejected"] for p in train + heldout)
    assert pref_eval.build_pairs(cfg) == (train, heldout)  # deterministic for a seed


def test_the_evaluation_scores_every_method_on_held_out_pairs_of_real_users(ray_cluster, tmp_path):
    report = pref_eval.main(small_config(tmp_path))
    assert report["pairs"] == {"train": 9, "heldout": 3} and report["users"] == 3
    for method in ("unsteered (reference)", "population", "caa", "bt"):
        assert 0.0 <= report["methods"][method]["accuracy"] <= 1.0
    assert report["store"]["caa_vector_bytes_per_user_raw"] == 8 * 576 * 4
    assert report["store"]["bt_theta_bytes_per_user_raw"] == 8 * 4
    assert json.loads((tmp_path / "results.json").read_text())["methods"]["caa"]["alpha"] in (1.0, 2.0)
