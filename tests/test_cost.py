"""The model-work counter of `steerstore bench cost`: its counts against plain arithmetic, and the bench itself."""

import json

from steerstore.jobs.bench.cost import BenchCostConfig, BlockCounter, flops_per_fte, main, shape_of


def test_a_full_forward_counts_every_token_through_every_block(tiny_runtime):
    rt = tiny_runtime
    encoded = rt.encode(["Tell me about the weather today.", "Say hi."], ["Wow, amazing!", "Noted."])
    ids, mask, pos = rt.collate([e.ids for e in encoded], "right")
    with BlockCounter(rt) as counter, counter.at("plain"):
        rt.forward(ids, mask, pos, base_only=True)
    c = counter.counts["plain"]
    assert c["forward_block_tokens"] == ids.shape[0] * ids.shape[1] * rt.num_layers
    assert c["backward_block_tokens"] == 0 and c["decode_block_steps"] == 0
    assert counter.figures()["plain"]["forward_token_equivalents"] == ids.numel()
    with counter.at("after"):  # hooks removed on exit: nothing more is counted
        rt.forward(ids, mask, pos, base_only=True)
    assert "after" not in counter.counts


def test_a_pass_that_stops_early_counts_only_the_blocks_it_runs(tiny_runtime):
    rt = tiny_runtime
    with BlockCounter(rt) as counter, counter.at("capture"):
        rt.activations(["Tell me a story."], ["Once upon a time."], layers=[1])
    encoded = rt.encode(["Tell me a story."], ["Once upon a time."])
    assert counter.counts["capture"]["forward_block_tokens"] == len(encoded[0].ids) * 2  # blocks 0 and 1 of 4


def test_attribution_counts_its_backward_and_decoding_its_steps(tiny_runtime):
    rt = tiny_runtime
    encoded = rt.encode(["Tell me a story.", "Write a line."], ["Once upon a time.", "A line."])
    with BlockCounter(rt) as counter:
        with counter.at("attribution"):
            rt.head_attribution(encoded, [0, 1], 2)
        with counter.at("decode"):
            rt.generate(["Say something.", "Write a line."], max_new_tokens=3)
    a = counter.counts["attribution"]
    assert a["backward_block_tokens"] == a["forward_block_tokens"] > 0  # every block's output gets its gradient
    fig = counter.figures()["attribution"]
    assert fig["forward_token_equivalents"] == 3 * a["forward_block_tokens"] / rt.num_layers
    d = counter.counts["decode"]
    assert 2 <= d["decode_block_steps"] / rt.num_layers <= 2 * 3  # two rows, up to 3 new tokens (EOS may stop one)


def test_flops_per_token_of_the_8b_shape_match_its_parameter_count():
    weights, attention = flops_per_fte(shape_of("llama-3.1-8b"))
    # Llama-3.1-8B: 8.03e9 parameters, of which 2 × 128256 × 4096 embeddings and LM head: 6.98e9 in the blocks
    assert abs(weights / 2 - 6.98e9) / 6.98e9 < 0.01
    assert attention == 2 * 4096 * 32


def test_the_cost_bench_runs_every_stage_of_a_typical_user_and_writes_its_figures(tmp_path):
    out = tmp_path / "cost.json"
    result = main(BenchCostConfig(shape="tiny", users=2, items=3, item_tokens=12, input_tokens=6, pairs=2, pair_tokens=20,
                                  pool_users=2, out=str(tmp_path), json=str(out)))
    stages = result["stages"]
    assert set(stages) == {"caa", "dps", "steerx_loo", "smoothing", "style_vectors", "recommend"}
    assert all(sum(s["status"].values()) == 2 for s in stages.values()), stages  # both users, every stage
    # a random model's descriptions may fail the checks (quarantined); the model stages must work
    assert all(stages[k]["status"] == {"ok": 2} for k in ("caa", "dps", "steerx_loo", "style_vectors", "recommend")), \
        stages
    assert all(s["forward_token_equivalents"] > 0 for s in stages.values())
    assert stages["dps"]["backward_tokens"] > 0 and stages["style_vectors"]["decode_steps"] > 0
    total = sum(s["forward_token_equivalents"] for s in stages.values())
    assert abs(result["total_forward_token_equivalents"] - total) < 1
    assert result["at_shape"]["users_per_gpu_hour"] > 0
    dep = result["dps_departures"]  # the attribution is part of DPS's work; verifying is the rest
    assert 0 < dep["attribution_fte"] < stages["dps"]["forward_token_equivalents"]
    assert abs(dep["attribution_fte"] + dep["verification_fte"] - stages["dps"]["forward_token_equivalents"]) < 1
    at = dep["total_fte_at_verified_share"]
    assert abs(at["1.0"] - total) < 1 and at["0.0"] < at["0.5"] < at["1.0"]
    assert json.loads(out.read_text())["total_forward_token_equivalents"] == result["total_forward_token_equivalents"]
    assert result["settings"] == {}  # the refresh's defaults


def test_a_profile_is_counted_with_the_refresh_settings_it_names(tmp_path):
    """Method sections override the refresh's defaults: fewer verified heads and no DPS context cost less, the
    other stages are unchanged, and the run records what it changed."""
    from steerstore.operators.dps import DPSConfig
    from steerstore.operators.history import HistoryContextConfig

    small = dict(shape="tiny", users=1, items=3, item_tokens=12, input_tokens=6, pairs=2, pair_tokens=20,
                 pool_users=2, out=str(tmp_path), json="")
    base = main(BenchCostConfig(**small))
    cheap = main(BenchCostConfig(**small, dps=DPSConfig(top_k=2, candidates=2,
                                                         history=HistoryContextConfig(context_items=0))))
    assert cheap["settings"] == {"dps.top_k": 2, "dps.candidates": 2, "dps.history.context_items": 0,
                                 "dps.history.arrangement": "items"}  # per-item sequences without context
    assert cheap["stages"]["dps"]["forward_token_equivalents"] < base["stages"]["dps"]["forward_token_equivalents"]
    assert cheap["stages"]["caa"]["forward_token_equivalents"] == base["stages"]["caa"]["forward_token_equivalents"]
