"""Teacher-forced scoring under DPS head-contrast decoding (ModelRuntime.contrast_logprobs)."""

import math

import pytest
import torch

from steerstore.operators.runtime import HeadContrast, ModelConfig, ModelRuntime, scoring

PROMPTS = ["Tell me about the weather today, please.", "Hi there", "Summarise the plot of a novel in one sentence."]
HEADS = [[(1, 0), (2, 3)], [(0, 2), (3, 1)], [(1, 1)]]
STEPS = 6


@pytest.fixture
def rt(tiny_runtime):
    """The session's tiny Llama runtime (tests that patch its tokenisation do so through ``monkeypatch``)."""
    return tiny_runtime


def _as_token_responses(monkeypatch, rt, id_lists):
    """Placeholder response strings whose tokens are exactly ``id_lists`` (decoded bytes need not round-trip)."""
    table = {f"\x00tokens {k}": list(ids) for k, ids in enumerate(id_lists)}
    real = rt.text.response_ids
    monkeypatch.setattr(rt.text, "response_ids", lambda rs: [table[r] if r in table else real([r])[0] for r in rs])
    return list(table)


def _branches(rt, seq, prompt_len, heads):
    """Next-token log-probabilities after ``seq``, no cache: the full model, and the model with ``heads``
    ablated at positions >= prompt_len − 1 (a per-position gate; earlier prompt positions unablated)."""
    x = torch.tensor([seq])
    gates = torch.ones((1, len(seq), rt.num_layers, rt.num_heads))
    gates[0, prompt_len - 1:] = rt.head_gates([heads])[0]
    with torch.no_grad():
        full = torch.log_softmax(rt.model(input_ids=x).logits[0, -1].float(), -1)
        with rt.head_gating(gates):
            masked = torch.log_softmax(rt.model(input_ids=x).logits[0, -1].float(), -1)
    return full, masked


def _contrast(full, masked, gamma, adaptive):
    """log p_γ over the vocabulary, the formula as written (no plausibility floor)."""
    if adaptive:
        p = full.exp()
        gamma = gamma * float(-(p * torch.where(p > 0, full, 0.0)).sum()) / math.log(full.shape[-1])
    return torch.log_softmax((1 + gamma) * full - gamma * masked, -1)


def _reference_decode(rt, prompt, heads, gamma, adaptive, steps=STEPS):
    """Greedy tokens of the contrast distribution, one full forward of both branches per step."""
    seq = rt.prompt_ids([prompt])[0]
    n, out = len(seq), []
    for _ in range(steps):
        nxt = int(_contrast(*_branches(rt, seq, n, heads), gamma, adaptive).argmax())
        if nxt in rt.eos_token_ids:
            break
        out.append(nxt)
        seq = seq + [nxt]
    return out


def _reference_scores(rt, prompt, response_ids, heads, gammas, adaptive):
    """Σ log p_γ(response token | prefix) per γ, token by token; and whether each token was p_γ's argmax."""
    prompt_ids = rt.prompt_ids([prompt])[0]
    totals = [0.0] * len(gammas)
    argmax = [[] for _ in gammas]
    for t, token in enumerate(response_ids):
        full, masked = _branches(rt, prompt_ids + list(response_ids[:t]), len(prompt_ids), heads)
        for k, gamma in enumerate(gammas):
            lp = _contrast(full, masked, gamma, adaptive)
            totals[k] += float(lp[token])
            argmax[k].append(int(lp.argmax()) == token)
    return torch.tensor(totals), argmax


@pytest.mark.parametrize("adaptive", [False, True])
def test_scores_match_a_token_by_token_reference_and_decoding_picks_their_argmax(rt, monkeypatch, adaptive):
    gamma = 2.0
    contrast = HeadContrast(HEADS, gamma=gamma, plausibility=0.0, adaptive=adaptive)  # default prefill: shared
    decoded = rt.generate(PROMPTS, max_new_tokens=STEPS, contrast=contrast)
    assert decoded != rt.generate(PROMPTS, max_new_tokens=STEPS), "the contrast changed nothing"
    tokens = [_reference_decode(rt, p, h, gamma, adaptive) for p, h in zip(PROMPTS, HEADS)]
    assert decoded == [rt.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
    assert all(tokens), "every row decoded at least one token"

    gammas = [0.0, gamma, 0.5, -0.5]
    responses = _as_token_responses(monkeypatch, rt, tokens)
    got, counts = rt.contrast_logprobs(PROMPTS, responses, HEADS, gammas, adaptive=adaptive)
    assert got.dtype == torch.float32 and got.shape == (len(gammas), len(PROMPTS))
    assert counts.tolist() == [len(t) for t in tokens]
    for i, (prompt, heads) in enumerate(zip(PROMPTS, HEADS)):
        want, argmax = _reference_scores(rt, prompt, tokens[i], heads, gammas, adaptive)
        torch.testing.assert_close(got[:, i], want, rtol=1e-4, atol=1e-4)
        assert all(argmax[1]), f"row {i}: a decoded token is not the argmax of the γ={gamma} distribution"
    plain, plain_counts = rt.response_logprobs(PROMPTS, responses)
    torch.testing.assert_close(got[0], plain, rtol=1e-5, atol=1e-4)  # γ = 0: the plain log-likelihood
    assert torch.equal(counts, plain_counts)
    assert not torch.allclose(got[1], plain, atol=1e-2), "the contrast changed no score"


def test_the_decoded_token_is_the_argmax_of_a_normalised_distribution_over_the_vocabulary(rt, monkeypatch):
    """Score every vocabulary continuation of a decoded prefix: it sums to one and peaks at the decoded token."""
    gamma, heads = 1.5, HEADS[0]
    decoded = rt.generate(PROMPTS[:1], max_new_tokens=3, contrast=HeadContrast([heads], gamma=gamma, plausibility=0.0))
    tokens = _reference_decode(rt, PROMPTS[0], heads, gamma, False, steps=3)
    assert decoded[0] == rt.tokenizer.decode(tokens, skip_special_tokens=True) and len(tokens) == 3
    vocab = rt.model.get_output_embeddings().weight.shape[0]
    prefix = tokens[:2]
    candidates = [prefix + [v] for v in range(vocab)]
    responses = _as_token_responses(monkeypatch, rt, [prefix] + candidates)
    got, _ = rt.contrast_logprobs(PROMPTS[:1] * len(responses), responses, [heads] * len(responses), [gamma])
    step = got[0, 1:] - got[0, 0]  # log p_γ(v | prompt + prefix) for every v
    torch.testing.assert_close(torch.logsumexp(step.double(), 0), torch.tensor(0.0, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    assert int(step.argmax()) == tokens[2]


def test_a_row_without_heads_scores_plainly_for_every_gamma(rt):
    responses = ["Wow, I love it! Amazing.", "Noted. The answer is brief and formal.", "The fox jumps."]
    gammas = [0.0, 1.0, 5.0, -0.5]
    plain, _ = rt.response_logprobs(PROMPTS, responses)
    for adaptive in (False, True):
        got, counts = rt.contrast_logprobs(PROMPTS, responses, [[], HEADS[1], None], gammas, adaptive=adaptive)
        for k in range(len(gammas)):
            torch.testing.assert_close(got[k, [0, 2]], plain[[0, 2]], rtol=1e-5, atol=1e-4)
        assert not torch.allclose(got[1, 1], plain[1], atol=1e-2), "the row with heads scored plainly"
    got, _ = rt.contrast_logprobs(PROMPTS, responses, [[]] * 3, gammas)  # no row ablated: no masked forward
    torch.testing.assert_close(got, plain.expand(len(gammas), -1), rtol=1e-5, atol=1e-4)


def test_micro_batches_padding_and_chunks_do_not_change_the_scores(rt, monkeypatch):
    prompts = PROMPTS + ["The fox", "Hi"]
    responses = ["Wow, I love it! Amazing, fantastic, wonderful!", "Noted.", "The quick brown fox jumps over it.",
                 "", "Tell me about the weather today, please. Summarise the plot."]
    heads = [HEADS[0], [], HEADS[1], HEADS[2], [(3, 3), (0, 0), (2, 1)]]
    gammas = [0.0, 1.0, 3.0]
    for adaptive in (False, True):
        alone = [rt.contrast_logprobs([p], [r], [h], gammas, adaptive=adaptive)
                 for p, r, h in zip(prompts, responses, heads)]
        want = torch.cat([a[0] for a in alone], dim=1)
        got, counts = rt.contrast_logprobs(prompts, responses, heads, gammas, adaptive=adaptive)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        assert counts.tolist() == [int(a[1][0]) for a in alone]
        assert counts[3] == 0 and torch.equal(got[:, 3], torch.zeros(len(gammas)))
        # several micro-batches of a few rows each, and LM-head chunks of 7 tokens
        small = ModelRuntime(ModelConfig(name_or_path="tiny-llama", max_batch_tokens=64),
                             model=rt.model, tokenizer=rt.tokenizer)
        batches = small.micro_batches([len(e.ids) for e in small.encode(prompts, responses)])
        assert len(batches) > 1 and max(len(b) for b in batches) > 1, batches
        monkeypatch.setattr(scoring, "CONTRAST_CHUNK_ELEMENTS", 7 * rt.model.get_output_embeddings().weight.shape[0])
        split, _ = small.contrast_logprobs(prompts, responses, heads, gammas, adaptive=adaptive)
        monkeypatch.undo()
        torch.testing.assert_close(split, want, rtol=1e-5, atol=1e-4)


def test_gating_from_a_start_position_equals_a_per_position_gate(rt):
    """hooks.head_gating(start=...) gates positions >= start (the forward's real positions) like a 4-D gate."""
    enc = rt.encode(PROMPTS[:2], ["Noted. The answer is brief.", "Wow"])
    ids, mask, pos = rt.collate([e.ids for e in enc], "right")
    gates = rt.head_gates(HEADS[:2])
    start = torch.tensor([e.prompt_len - 1 for e in enc])
    per_position = torch.ones((2, ids.shape[1], rt.num_layers, rt.num_heads))
    for i, s in enumerate(start.tolist()):
        per_position[i, s:] = gates[i]
    with torch.no_grad():
        with rt.head_gating(gates, start=start):
            got = rt.forward(ids, mask, pos, base_only=True).last_hidden_state
        with rt.head_gating(per_position):
            want = rt.forward(ids, mask, pos, base_only=True).last_hidden_state
        plain = rt.forward(ids, mask, pos, base_only=True).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real])
    for i, s in enumerate(start.tolist()):  # before the start nothing is ablated
        torch.testing.assert_close(got[i, :s], plain[i, :s])
    assert not torch.allclose(got[real], plain[real])


def test_bad_inputs_are_rejected(rt):
    with pytest.raises(ValueError, match="2 prompts, 1 responses and 2 head sets"):
        rt.contrast_logprobs(PROMPTS[:2], ["a"], HEADS[:2], [1.0])
    with pytest.raises(ValueError, match="2 prompts, 2 responses and 1 head sets"):
        rt.contrast_logprobs(PROMPTS[:2], ["a", "b"], HEADS[:1], [1.0])
    with pytest.raises(ValueError, match="query heads 0..3"):
        rt.contrast_logprobs(PROMPTS[:1], ["a"], [[(0, 9)]], [1.0])
    with pytest.raises(ValueError, match="layers 0..3"):
        rt.contrast_logprobs(PROMPTS[:1], ["a"], [[(4, 0)]], [1.0])
    with pytest.raises(ValueError, match=r"heads\[0\] must be \(layer, head\) pairs"):
        rt.contrast_logprobs(PROMPTS[:1], ["a"], [[(0, 1, 2)]], [1.0])
    with pytest.raises(ValueError, match="gammas must be finite"):
        rt.contrast_logprobs(PROMPTS[:1], ["a"], [[(0, 1)]], [float("nan")])
    with pytest.raises(ValueError, match="gammas must be numbers"):
        rt.contrast_logprobs(PROMPTS[:1], ["a"], [[(0, 1)]], ["x"])
    with pytest.raises(ValueError, match="gates must be"):
        with rt.head_gating(torch.ones(1, rt.num_layers + 1, rt.num_heads)):
            pass
    with pytest.raises(ValueError, match="start must be one position per row"):
        with rt.head_gating(rt.head_gates([[(0, 1)]]), start=torch.tensor([1, 2])):
            pass
    got, counts = rt.contrast_logprobs(PROMPTS[:1], ["a"], [[(0, 1)]], [])
    assert got.shape == (0, 1) and counts.tolist() == [1]
