"""The shared model runtime: layer resolution, batched capture and per-row steering."""

import json

import pytest
import torch

from steerstore.operators.runtime import (
    ModelConfig,
    ModelRuntime,
    Steering,
    UnsupportedArchitecture,
    decoder_layers,
    weights_fingerprint,
)
from tests.tiny import tiny_model, tiny_tokenizer

PROMPTS = ["Tell me about the weather today, please.", "Hi", "Summarise the plot of a novel in one sentence."]
RESPONSES = ["Wow, I love it!", "Noted. The answer is brief and formal.", "The fox jumps."]


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma"])
def test_decoder_layers_are_found_for_supported_families(model_type):
    model = tiny_model(model_type)
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers
    assert hasattr(layers[0].self_attn, "o_proj")


def test_an_unknown_architecture_fails_with_a_message_saying_how_to_fix_it():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitecture, match="DECODER_LAYER_PATHS"):
        decoder_layers(model)


def test_layer_i_is_the_output_of_decoder_block_i(tiny_runtime):
    rt = tiny_runtime
    enc = rt.encode(PROMPTS[:1], RESPONSES[:1])[0]
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        hs = rt.model(input_ids=ids, output_hidden_states=True).hidden_states
    got = rt.activations(PROMPTS[:1], RESPONSES[:1], layers=[0, 1, 2], position="last")
    for j, layer in enumerate([0, 1, 2]):
        torch.testing.assert_close(got[0, j], hs[layer + 1][0, -1].float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("position", ["mean", "last"])
def test_batched_capture_equals_a_per_example_loop(tiny_runtime, position):
    rt = tiny_runtime
    batched = rt.activations(PROMPTS, RESPONSES, layers=[1, 3], position=position)
    for i in range(len(PROMPTS)):
        single = rt.activations(PROMPTS[i:i + 1], RESPONSES[i:i + 1], layers=[1, 3], position=position)
        torch.testing.assert_close(batched[i], single[0], rtol=1e-4, atol=1e-4)


def test_padding_side_does_not_change_captured_activations(tiny_runtime):
    right = tiny_runtime.activations(PROMPTS, RESPONSES, layers=[0, 2], padding_side="right")
    left = tiny_runtime.activations(PROMPTS, RESPONSES, layers=[0, 2], padding_side="left")
    torch.testing.assert_close(left, right, rtol=1e-4, atol=1e-4)


def test_mean_capture_averages_exactly_the_response_tokens(tiny_runtime):
    rt = tiny_runtime
    enc = rt.encode(PROMPTS[:1], RESPONSES[:1])[0]
    with torch.no_grad():
        hs = rt.model(input_ids=torch.tensor([enc.ids]), output_hidden_states=True).hidden_states
    got = rt.activations(PROMPTS[:1], RESPONSES[:1], layers=[1], position="mean")
    torch.testing.assert_close(got[0, 0], hs[2][0, enc.prompt_len:].mean(0), rtol=1e-4, atol=1e-4)


def test_micro_batching_under_a_small_token_budget_gives_the_same_activations():
    small = ModelRuntime(ModelConfig(name_or_path="tiny", max_batch_tokens=64), model=tiny_model(),
                         tokenizer=tiny_tokenizer())
    big = ModelRuntime(ModelConfig(name_or_path="tiny", max_batch_tokens=100000), model=tiny_model(),
                       tokenizer=tiny_tokenizer())
    assert len(small.micro_batches([len(e.ids) for e in small.encode(PROMPTS, RESPONSES)])) > 1
    torch.testing.assert_close(small.activations(PROMPTS, RESPONSES, [1]), big.activations(PROMPTS, RESPONSES, [1]),
                               rtol=1e-4, atol=1e-4)


def test_own_greedy_decoding_matches_transformers_generate(tiny_runtime):
    rt = tiny_runtime
    ours = rt.generate(PROMPTS, max_new_tokens=12)
    for prompt, text in zip(PROMPTS, ours):
        ids = torch.tensor([rt.prompt_ids([prompt])[0]])
        ref = rt.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                pad_token_id=rt.tokenizer.pad_token_id)
        expected = rt.tokenizer.decode(
            [t for t in ref[0, ids.shape[1]:].tolist() if t not in rt.eos_token_ids], skip_special_tokens=True)
        assert text == expected[: len(text)] and len(text) >= len(expected.split("<|im_end|>")[0]) - 1


def _vectors(rt, rows, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {1: torch.randn(rows, rt.hidden_size, generator=g), 2: torch.randn(rows, rt.hidden_size, generator=g)}


def test_steering_a_batch_with_per_row_vectors_equals_steering_each_row_alone(tiny_runtime):
    rt = tiny_runtime
    vecs = _vectors(rt, len(PROMPTS))
    steer = Steering(vecs, scales=torch.tensor([2.0, 0.0, -3.0]))
    batched = rt.generate(PROMPTS, max_new_tokens=10, steer=steer)
    for i, prompt in enumerate(PROMPTS):
        alone = rt.generate([prompt], max_new_tokens=10, steer=steer.select([i]))
        assert batched[i] == alone[0]


def test_steering_changes_the_output_and_zero_scale_does_not(tiny_runtime):
    rt = tiny_runtime
    plain = rt.generate(PROMPTS, max_new_tokens=10)
    zero = rt.generate(PROMPTS, max_new_tokens=10, steer=Steering(_vectors(rt, 3), torch.zeros(3)))
    strong = rt.generate(PROMPTS, max_new_tokens=10, steer=Steering(_vectors(rt, 3), torch.full((3,), 8.0)))
    assert zero == plain
    assert strong != plain


def test_response_positions_leave_the_prompt_untouched_except_its_last_token(tiny_runtime):
    rt = tiny_runtime
    seqs = rt.prompt_ids(PROMPTS[:1])
    ids, mask, pos = rt.collate(seqs)
    with torch.no_grad():
        plain = rt.forward(ids, mask, pos).logits
        start = torch.tensor([len(seqs[0]) - 1])
        with rt.steering(Steering(_vectors(rt, 1), torch.tensor([5.0]), positions="response"), start):
            steered = rt.forward(ids, mask, pos).logits
        with rt.steering(Steering(_vectors(rt, 1), torch.tensor([5.0]), positions="all")):
            everywhere = rt.forward(ids, mask, pos).logits
    torch.testing.assert_close(steered[0, :-1], plain[0, :-1])
    assert not torch.allclose(steered[0, -1], plain[0, -1])
    assert not torch.allclose(everywhere[0, 0], plain[0, 0])


def test_hooks_are_removed_even_when_the_body_raises(tiny_runtime):
    rt = tiny_runtime
    before = [len(layer._forward_hooks) for layer in rt.layers]  # transformers keeps its own hooks
    with pytest.raises(RuntimeError, match="boom"):
        with rt.steering(Steering(_vectors(rt, 1), torch.ones(1), positions="all")):
            assert [len(layer._forward_hooks) for layer in rt.layers][1] == before[1] + 1
            raise RuntimeError("boom")
    assert [len(layer._forward_hooks) for layer in rt.layers] == before


def test_invalid_layers_are_rejected_with_the_valid_range(tiny_runtime):
    with pytest.raises(ValueError, match=r"layers 0\.\.3"):
        tiny_runtime.activations(PROMPTS, RESPONSES, layers=[7])


def test_the_weights_fingerprint_ignores_dtype_but_not_the_weights():
    a = tiny_model(seed=0)
    assert weights_fingerprint(a) == weights_fingerprint(tiny_model(seed=0).to(torch.bfloat16))
    assert weights_fingerprint(a) != weights_fingerprint(tiny_model(seed=1))


def test_response_logprobs_equal_a_full_forward_per_example(tiny_runtime):
    rt = tiny_runtime
    got, counts = rt.response_logprobs(PROMPTS, RESPONSES)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        enc = rt.encode([p], [r])[0]
        with torch.no_grad():
            logits = rt.model(input_ids=torch.tensor([enc.ids])).logits[0]
        lp = torch.log_softmax(logits[enc.prompt_len - 1:-1], -1)
        expected = lp.gather(-1, torch.tensor(enc.ids[enc.prompt_len:])[:, None]).sum()
        assert counts[i] == len(enc.ids) - enc.prompt_len
        torch.testing.assert_close(got[i], expected, rtol=1e-4, atol=1e-3)


def test_steered_logprobs_of_a_batch_equal_each_row_steered_alone(tiny_runtime):
    rt = tiny_runtime
    steer = Steering(_vectors(rt, 3), torch.tensor([3.0, 0.0, -2.0]))
    batched, _ = rt.response_logprobs(PROMPTS, RESPONSES, steer=steer)
    plain, _ = rt.response_logprobs(PROMPTS, RESPONSES)
    for i in range(3):
        alone, _ = rt.response_logprobs(PROMPTS[i:i + 1], RESPONSES[i:i + 1], steer=steer.select([i]))
        torch.testing.assert_close(batched[i], alone[0], rtol=1e-4, atol=1e-3)
    assert torch.isclose(batched[1], plain[1], atol=1e-3) and not torch.isclose(batched[0], plain[0], atol=1e-2)


def test_choose_scale_picks_the_most_accurate_alpha_within_the_fluency_budget(tiny_runtime):
    import numpy as np

    from steerstore.operators.scale import ScaleConfig, baseline, choose_scale, margins

    rt = tiny_runtime
    pairs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(PROMPTS, RESPONSES, RESPONSES[::-1])]
    vec = {1: _vectors(rt, 3)[1].numpy()}
    base = baseline(rt, pairs)
    m0, nll0 = margins(rt, pairs, vec, 1e-9, base)
    np.testing.assert_allclose(m0, 0, atol=1e-3)  # no steering: no margin, no fluency cost
    np.testing.assert_allclose(nll0, 0, atol=1e-4)
    alpha, curve = choose_scale(rt, pairs, vec, ScaleConfig(grid=[0.5, 2.0, 8.0], max_nll_increase=1e9, fluency_tokens=0), base)
    assert [c["alpha"] for c in curve] == [0.5, 2.0, 8.0]
    # every curve point recomputed from steered and unsteered log-likelihoods (not through margins())
    prompts = [p["prompt"] for p in pairs]
    c_0, n_0 = rt.response_logprobs(prompts, [p["chosen"] for p in pairs])
    r_0, _ = rt.response_logprobs(prompts, [p["rejected"] for p in pairs])
    same = np.asarray([p["chosen"] == p["rejected"] for p in pairs])  # pair 1: margin 0 by definition
    assert same.tolist() == [False, True, False]
    expected_accuracy = []
    for point in curve:
        steer = Steering({1: torch.as_tensor(vec[1], dtype=torch.float32)}, torch.full((3,), point["alpha"]), "response")
        c_a, _ = rt.response_logprobs(prompts, [p["chosen"] for p in pairs], steer)
        r_a, _ = rt.response_logprobs(prompts, [p["rejected"] for p in pairs], steer)
        ref_margin = ((c_a - c_0) - (r_a - r_0)).numpy()
        ref_nll = (-(c_a - c_0) / n_0).numpy()
        assert np.all(np.abs(ref_margin[~same]) > 1e-2), ref_margin  # no margin near 0: the sign is unambiguous
        hits = (ref_margin > 0) & ~same
        expected_accuracy.append(float(hits.mean()))
        assert point["accuracy"] == pytest.approx(hits.mean(), abs=1e-9), (point, ref_margin)
        assert point["mean_margin"] == pytest.approx(float(ref_margin.mean()), abs=1e-3), (point, ref_margin)
        assert point["nll_increase"] == pytest.approx(float(ref_nll.mean()), abs=1e-4), (point, ref_nll)
    assert len(set(expected_accuracy)) > 1 and 0.5 not in expected_accuracy  # a flipped sign would show
    best = max(curve, key=lambda c: (c["accuracy"], c["mean_margin"]))
    assert alpha == best["alpha"]
    strict, _ = choose_scale(rt, pairs, vec, ScaleConfig(grid=[0.5, 2.0, 8.0], max_nll_increase=-1e9, fluency_tokens=0), base)
    assert strict == 0.5  # nothing passes the guard: the smallest α
    # one pair's margin by hand: (log p steered − unsteered) of chosen minus the same of rejected
    m2, nll2 = margins(rt, pairs, vec, 2.0, base)
    one = Steering({1: torch.as_tensor(vec[1][:1], dtype=torch.float32)}, torch.tensor([2.0]), "response")
    c_s, n_c = rt.response_logprobs([pairs[0]["prompt"]], [pairs[0]["chosen"]], one)
    r_s, _ = rt.response_logprobs([pairs[0]["prompt"]], [pairs[0]["rejected"]], one)
    c_0, _ = rt.response_logprobs([pairs[0]["prompt"]], [pairs[0]["chosen"]])
    r_0, _ = rt.response_logprobs([pairs[0]["prompt"]], [pairs[0]["rejected"]])
    assert m2[0] == pytest.approx(float((c_s - c_0) - (r_s - r_0)), abs=1e-3)
    assert nll2[0] == pytest.approx(float(-(c_s - c_0) / n_c), abs=1e-4)
    # the fluency guard excludes the most accurate α when its NLL rise is over the limit
    by_alpha = {c["alpha"]: c for c in curve}
    cheapest = min(curve, key=lambda c: c["nll_increase"])
    assert best["nll_increase"] > cheapest["nll_increase"], curve  # here the most accurate α costs the most
    limit = (best["nll_increase"] + cheapest["nll_increase"]) / 2
    guarded, _ = choose_scale(rt, pairs, vec, ScaleConfig(grid=[0.5, 2.0, 8.0], max_nll_increase=limit, fluency_tokens=0), base)
    assert guarded != best["alpha"] and by_alpha[guarded]["nll_increase"] <= limit


def test_the_decoded_fluency_guard_refuses_an_alpha_whose_greedy_answers_lose_fluency(tiny_runtime):
    """Each α's perplexity ratio: its greedy answers' perplexity under the unsteered model (given the prompt) over
    the unsteered answers', each row decoded alone here; an α over ``max_perplexity_ratio`` is not chosen."""
    from steerstore.operators.scale import ScaleConfig, baseline, choose_scale, choose_scales, perplexity

    rt = tiny_runtime
    pairs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(PROMPTS, RESPONSES, RESPONSES[::-1])]
    vec = {1: _vectors(rt, 3)[1].numpy()}
    base = baseline(rt, pairs)
    grid = [0.5, 8.0, 64.0]
    free, curve = choose_scale(rt, pairs, vec, ScaleConfig(grid=grid, max_nll_increase=1e9, fluency_tokens=6,
                                                           max_perplexity_ratio=1e9), base)
    prompts = [p["prompt"] for p in pairs]
    plain = perplexity(rt, prompts, [rt.generate([p], 6)[0] for p in prompts])
    for point in curve:
        alone = [rt.generate([p], 6, steer=Steering({1: torch.as_tensor(vec[1][i:i + 1])}, torch.tensor([point["alpha"]]),
                                                    "response"))[0] for i, p in enumerate(prompts)]
        assert point["perplexity_ratio"] == pytest.approx(perplexity(rt, prompts, alone) / plain, rel=1e-4), point
    ratios = {c["alpha"]: c["perplexity_ratio"] for c in curve}
    assert len({round(r, 4) for r in ratios.values()}) > 1, ratios  # steering changed what the model writes
    limit = min(ratios.values())
    guarded, _ = choose_scale(rt, pairs, vec, ScaleConfig(grid=grid, max_nll_increase=1e9, fluency_tokens=6,
                                                          max_perplexity_ratio=max(limit, 1.0)), base)
    assert ratios[guarded] <= max(limit, 1.0)
    assert ratios[free] > max(limit, 1.0) and guarded != free, ratios  # the most accurate α was the least fluent
    # every method's curve: the unsteered answers decoded once for every method and records them
    out = choose_scales(rt, pairs, {"caa": vec, "bt": vec}, ScaleConfig(grid=grid, fluency_tokens=6))
    assert out["caa"]["plain_perplexity"] == pytest.approx(plain, rel=1e-4)
    assert [c["perplexity_ratio"] for c in out["bt"]["curve"]] == pytest.approx(list(ratios.values()), rel=1e-4)
    off = choose_scales(rt, pairs, {"caa": vec}, ScaleConfig(grid=grid, fluency_tokens=0))
    assert "plain_perplexity" not in off["caa"] and all("perplexity_ratio" not in c for c in off["caa"]["curve"])


@pytest.mark.slow
def test_the_content_guard_refuses_an_alpha_that_moves_the_answers_further_than_the_history_prompt(tiny_runtime):
    """Each α's content drift: 1 − BERTScore F1 of its greedy answers (each row decoded alone here) against the
    unsteered answers; the limit: max_drift_ratio × the drift of the history prompt's unsteered answers against the
    plain prompt's, on the pairs that have a history prompt."""
    from steerstore.operators.metrics import MetricsConfig, bertscore
    from steerstore.operators.scale import ScaleConfig, choose_scales

    rt = tiny_runtime
    pairs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(PROMPTS, RESPONSES, RESPONSES[::-1])]
    pairs[0]["history_prompt"] = f"Earlier responses written by this user: {RESPONSES[2]}\n\n{PROMPTS[0]}"
    pairs[2]["history_prompt"] = f"Earlier: {RESPONSES[1]} {RESPONSES[0]}\n\n{PROMPTS[2]}"
    vec = {1: _vectors(rt, 3)[1].numpy()}
    grid = [0.5, 8.0, 64.0]
    prompts = [p["prompt"] for p in pairs]
    plain = [rt.generate([p], 6)[0] for p in prompts]
    shown = [rt.generate([pairs[i]["history_prompt"]], 6)[0] for i in (0, 2)]

    def drift(outputs, references):
        return float((1 - bertscore(outputs, references, MetricsConfig())).mean())
    reference = drift(shown, [plain[0], plain[2]])
    assert reference > 0
    free = choose_scales(rt, pairs, {"caa": vec}, ScaleConfig(grid=grid, fluency_tokens=6, max_nll_increase=1e9,
                                                              max_perplexity_ratio=1e9, max_drift_ratio=1e9))["caa"]
    assert free["drift_reference"] == pytest.approx(reference, abs=1e-5)
    drifts = {}
    for point in free["curve"]:
        alone = [rt.generate([p], 6, steer=Steering({1: torch.as_tensor(vec[1][i:i + 1])},
                                                    torch.tensor([point["alpha"]]), "response"))[0]
                 for i, p in enumerate(prompts)]
        assert point["content_drift"] == pytest.approx(drift(alone, plain), abs=1e-5), point
        assert point["drift_limit"] == pytest.approx(1e9 * reference)
        drifts[point["alpha"]] = point["content_drift"]
    assert drifts[64.0] > drifts[0.5], drifts  # a strong α moves what the model writes
    # a limit below the freely chosen α's drift: that α is refused, and the chosen one keeps to the limit
    ratio = (drifts[free["alpha"]] - 1e-6) / reference
    guarded = choose_scales(rt, pairs, {"caa": vec}, ScaleConfig(grid=grid, fluency_tokens=6, max_nll_increase=1e9,
                                                                 max_perplexity_ratio=1e9, max_drift_ratio=ratio))["caa"]
    assert guarded["drift_limit"] == pytest.approx(ratio * reference)
    if min(drifts.values()) <= ratio * reference:
        assert guarded["alpha"] != free["alpha"] and drifts[guarded["alpha"]] <= ratio * reference
    else:  # nothing passes: the smallest α, as with the other guards
        assert guarded["alpha"] == min(grid)
    # a given reference (the composed condition reuses the plain one's) is used as it is
    given = choose_scales(rt, [dict(p, history_prompt=None) for p in pairs], {"caa": vec},
                          ScaleConfig(grid=grid, fluency_tokens=6), drift_reference=0.25)["caa"]
    assert given["drift_reference"] == 0.25 and given["drift_limit"] == 0.25
    # off without history prompts or with the guard off: no drift recorded, no limit
    for cfg, ps in ((ScaleConfig(grid=grid, fluency_tokens=6), [{k: v for k, v in p.items() if k != "history_prompt"}
                                                                for p in pairs]),
                    (ScaleConfig(grid=grid, fluency_tokens=6, max_drift_ratio=0), pairs),
                    (ScaleConfig(grid=grid, fluency_tokens=6, history_items=0), pairs)):
        out = choose_scales(rt, ps, {"caa": vec}, cfg)["caa"]
        assert "drift_limit" not in out and all("content_drift" not in c for c in out["curve"])
    with pytest.raises(RuntimeError, match="scale.max_drift_ratio"):
        ScaleConfig(drift_encoder="/nonexistent/encoder").check_content_guard()
    ScaleConfig(drift_encoder="/nonexistent/encoder", max_drift_ratio=0).check_content_guard()  # off: not needed


def test_the_runtime_benchmark_measures_every_pass_on_a_tiny_shape(tmp_path):
    from steerstore.jobs.bench import runtime as bench
    from tests.tiny import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "tok")
    cfg = bench.BenchRuntimeConfig(shape="tiny", tokenizer=str(tmp_path / "tok"), users=1, pairs=2, items=2,
                                   item_tokens=12, pair_tokens=16, context_items=1, ablation_heads=3,
                                   decode_rows=2, decode_tokens=3, naive_sequences=2, repeats=1,
                                   json=str(tmp_path / "out.json"))
    result = bench.main(cfg)
    assert set(result["passes"]) == set(bench.PASSES)
    work = bench.workload(cfg, 49152)
    assert result["passes"]["scoring"]["tokens"] == sum(len(e.ids) for e in work["scored"])
    assert result["passes"]["ablation"]["heads"] == 3
    # FLOPs of a forward: 2 per block parameter per token + causal attention, by hand for one sequence
    rt = bench.build_runtime(cfg)
    blocks = sum(p.numel() for layer in rt.layers for p in layer.parameters())
    expected = 2 * blocks * 10 + 2 * rt.num_layers * rt.hidden_size * 100
    from steerstore.operators.runtime import Encoded

    assert bench.forward_flops(rt, [Encoded(list(range(10)), 5)], 0) == expected
    assert json.loads((tmp_path / "out.json").read_text())["shape"] == "tiny"


def test_steering_gradients_are_the_derivative_of_each_rows_mean_log_probability(tiny_runtime):
    """Each row's gradient at each layer against central differences of the runtime's own steered scoring (a vector
    added from the last prompt token on, as at ``response`` positions), rows of different lengths in one batch."""
    rt = tiny_runtime
    grads = rt.steering_gradients(PROMPTS, RESPONSES, [1, 2])
    assert grads.shape == (3, 2, rt.hidden_size) and torch.isfinite(grads).all()
    g = torch.Generator().manual_seed(3)
    eps = 1e-2
    for i in range(3):
        _, n = rt.response_logprobs([PROMPTS[i]], [RESPONSES[i]])
        for j, layer in enumerate((1, 2)):
            u = torch.randn(rt.hidden_size, generator=g)
            u /= u.norm()
            f = [float(rt.response_logprobs([PROMPTS[i]], [RESPONSES[i]],
                                            Steering({layer: (s * u)[None]}, torch.ones(1), "response"))[0][0]) / int(n)
                 for s in (eps, -eps)]
            assert float(grads[i, j] @ u) == pytest.approx((f[0] - f[1]) / (2 * eps), rel=2e-2, abs=1e-4), (i, layer)
    alone = rt.steering_gradients(PROMPTS[1:2], RESPONSES[1:2], [2])
    torch.testing.assert_close(alone[0, 0], grads[1, 1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="empty response"):
        rt.steering_gradients(["Hi"], [""], [1])
    # the same forward pass can capture the response activations too: equal to the activation pass, same gradients
    for position in ("mean", "last"):
        both, acts = rt.steering_gradients(PROMPTS, RESPONSES, [2, 1], capture=position)
        torch.testing.assert_close(both, grads[:, [1, 0]], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(acts, rt.activations(PROMPTS, RESPONSES, [2, 1], position), rtol=1e-4, atol=1e-5)
    budget, hooks = rt.config.max_backward_tokens, [len(layer._forward_hooks) for layer in rt.layers]
    try:  # one row per micro-batch: the captured rows land in their places
        rt.config.max_backward_tokens = 1
        both, acts = rt.steering_gradients(PROMPTS, RESPONSES, [2, 1], capture="mean")
    finally:
        rt.config.max_backward_tokens = budget
    torch.testing.assert_close(both, grads[:, [1, 0]], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(acts, rt.activations(PROMPTS, RESPONSES, [2, 1], "mean"), rtol=1e-4, atol=1e-5)
    assert [len(layer._forward_hooks) for layer in rt.layers] == hooks  # every capture hook removed
