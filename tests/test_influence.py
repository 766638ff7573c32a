"""Influence decoding (context steering) and sampling in ModelRuntime.generate."""

import pytest
import torch

from steerstore.operators.runtime import HeadContrast, Influence, ModelConfig, ModelRuntime, Sampling, Steering
from tests.tiny import tiny_model, tiny_tokenizer

PROMPTS = ["Tell me about the weather today, please.", "Hi there", "Summarise the plot of a novel in one sentence.",
           "The fox"]
CONTEXTS = ["Wow, I absolutely love this! Amazing, fantastic, wonderful!", "Noted. Brief and formal.", "",
            "The quick brown fox jumps over the lazy dog. Tell me about the weather today, please."]
N = 10


def _runtime(max_batch_tokens=8192):
    return ModelRuntime(ModelConfig(name_or_path="tiny-llama", max_batch_tokens=max_batch_tokens),
                        model=tiny_model(), tokenizer=tiny_tokenizer())


def _with_context(prompts, contexts):
    return [f"{c}\n\n{p}" if c else p for p, c in zip(prompts, contexts)]


@pytest.fixture(scope="module")
def small_runtime():
    """Same weights as tiny_runtime, with a budget that splits the influence rows into several micro-batches."""
    rt = _runtime(max_batch_tokens=260)
    plain, ctx = rt.prompt_ids(PROMPTS), rt.prompt_ids(_with_context(PROMPTS, CONTEXTS))
    batches = rt.micro_batches([max(len(a), len(c)) for a, c in zip(plain, ctx)], extra=N, budget=130)
    assert len(batches) > 1 and max(len(b) for b in batches) > 1, batches
    return rt


def _reference(rt, prompt, context, lam, temperature, n=N, u=None, top_p=1.0, beta=0.0):
    """Batch 1, no cache, a full forward of both branches per step, the formula as written."""
    with_ctx = rt.prompt_ids(_with_context([prompt], [context]))[0]
    plain = rt.prompt_ids([prompt])[0]
    out = []
    for step in range(n):
        with torch.no_grad():
            ls = rt.model(input_ids=torch.tensor([with_ctx])).logits[0, -1].float()
            l0 = rt.model(input_ids=torch.tensor([plain])).logits[0, -1].float()
        lp, lp0 = torch.log_softmax(ls / temperature, -1), torch.log_softmax(l0 / temperature, -1)
        score = torch.log_softmax(lp + lam * (lp - lp0), -1)
        if beta > 0 and context and lam > 0:  # only tokens with p∅(v) >= β·max p∅ (untempered) may follow
            p0 = torch.softmax(l0, -1)
            score = torch.log_softmax(score.masked_fill(p0 < beta * p0.max(), float("-inf")), -1)
        if u is None:
            nxt = int(score.argmax())
        else:  # inverse CDF over the top-p nucleus of softmax(out)
            p, order = score.exp().sort(descending=True, stable=True)
            keep = int(((p.cumsum(0) - p) < top_p).sum()) if top_p < 1 else len(p)
            cdf = p[:keep].cumsum(0)
            nxt = int(order[min(int((cdf <= float(u[step]) * cdf[-1]).sum()), keep - 1)])
        if nxt in rt.eos_token_ids:
            break
        out.append(nxt)
        with_ctx, plain = with_ctx + [nxt], plain + [nxt]
    return rt.tokenizer.decode(out, skip_special_tokens=True)


def test_lambda_zero_decodes_the_context_prompt_and_minus_one_the_plain_prompt(tiny_runtime, small_runtime):
    with_ctx = tiny_runtime.generate(_with_context(PROMPTS, CONTEXTS), N)
    plain = tiny_runtime.generate(PROMPTS, N)
    assert with_ctx != plain, "the contexts changed nothing"
    for temperature in (0.6, 1.0):
        zero = small_runtime.generate(PROMPTS, N, influence=Influence(CONTEXTS, lam=0.0, temperature=temperature))
        minus = small_runtime.generate(PROMPTS, N, influence=Influence(CONTEXTS, lam=-1.0, temperature=temperature))
        assert zero == with_ctx
        assert minus == plain
    mixed = small_runtime.generate(PROMPTS, N, influence=Influence(CONTEXTS, lam=[0.0, -1.0, 3.0, -1.0]))
    assert mixed == [with_ctx[0], plain[1], plain[2], plain[3]]  # row 2 has no context: any λ is plain


@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_batched_influence_equals_an_unbatched_uncached_reference(small_runtime, temperature):
    rt = small_runtime
    lams = [0.5, 2.0, 2.0, 0.5]
    got = rt.generate(PROMPTS, N, influence=Influence(CONTEXTS, lam=lams, temperature=temperature))
    for i in range(len(PROMPTS)):
        assert got[i] == _reference(rt, PROMPTS[i], CONTEXTS[i], lams[i], temperature), f"row {i}"
    assert got != rt.generate(_with_context(PROMPTS, CONTEXTS), N), "λ = 2 changed nothing"


def test_a_plausibility_floor_keeps_influence_on_tokens_the_plain_prompt_finds_plausible(small_runtime):
    rt = small_runtime
    lams = [4.0, 4.0, 4.0, 4.0]
    free = rt.generate(PROMPTS, N, influence=Influence(CONTEXTS, lam=lams, temperature=0.6))
    floored = rt.generate(PROMPTS, N, influence=Influence(CONTEXTS, lam=lams, temperature=0.6, plausibility=0.3))
    for i in range(len(PROMPTS)):
        assert floored[i] == _reference(rt, PROMPTS[i], CONTEXTS[i], lams[i], 0.6, beta=0.3), f"row {i}"
    assert floored != free, "the floor changed nothing at λ = 4"
    assert floored[2] == free[2] == rt.generate([PROMPTS[2]], N)[0]  # no context: no floor, plain decoding
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=3)
    got = rt.generate(PROMPTS, N, influence=Influence(CONTEXTS, lam=lams, temperature=0.6, plausibility=0.3),
                      sampling=sampling)
    u = sampling.uniforms(len(PROMPTS), N)
    for i in range(len(PROMPTS)):
        assert got[i] == _reference(rt, PROMPTS[i], CONTEXTS[i], lams[i], 0.6, u=u[i], top_p=0.9, beta=0.3)
    # λ <= 0 rows are exact with or without a floor: the context in the prompt, the plain prompt
    zero = rt.generate(PROMPTS, N, influence=Influence(CONTEXTS, lam=[0.0, -1.0, 0.0, 0.0], plausibility=0.3))
    assert zero == rt.generate(PROMPTS, N, influence=Influence(CONTEXTS, lam=[0.0, -1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="plausibility must be in"):
        Influence(CONTEXTS, plausibility=1.0)


def test_sampled_influence_equals_the_reference_with_the_same_random_stream(small_runtime):
    rt = small_runtime
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=7)
    lams = [1.0, 0.5, 2.0, 1.5]
    got = rt.generate(PROMPTS, N, influence=Influence(CONTEXTS, lam=lams, temperature=0.6), sampling=sampling)
    u = sampling.uniforms(len(PROMPTS), N)
    for i in range(len(PROMPTS)):
        assert got[i] == _reference(rt, PROMPTS[i], CONTEXTS[i], lams[i], 0.6, u=u[i], top_p=0.9), f"row {i}"
    # the influence temperature applies; sampling's only switches sampling on
    hotter = Sampling(temperature=5.0, top_p=0.9, seed=7)
    assert rt.generate(PROMPTS, N, influence=Influence(CONTEXTS, lam=lams, temperature=0.6), sampling=hotter) == got


def _modes(rt, rows):
    g = torch.Generator().manual_seed(1)
    return {
        "plain": {},
        "steer": {"steer": Steering({1: torch.randn(rows, rt.hidden_size, generator=g)}, torch.full((rows,), 4.0))},
        "contrast": {"contrast": HeadContrast([[(1, 0), (2, 3)]] * rows, gamma=1.5, plausibility=0.0)},
        "influence": {"influence": Influence(CONTEXTS[:rows], lam=1.0)},
    }


@pytest.mark.parametrize("mode", ["plain", "steer", "contrast", "influence"])
def test_sampling_is_reproducible_seeded_and_greedy_at_the_limits(tiny_runtime, mode):
    rt = tiny_runtime
    kw = _modes(rt, len(PROMPTS))[mode]
    greedy = rt.generate(PROMPTS, N, **kw)
    hot = Sampling(temperature=3.0, seed=1)
    first = rt.generate(PROMPTS, 16, sampling=hot, **kw)
    assert rt.generate(PROMPTS, 16, sampling=hot, **kw) == first
    assert rt.generate(PROMPTS, 16, sampling=Sampling(temperature=3.0, seed=2), **kw) != first
    assert first != rt.generate(PROMPTS, 16, **kw)
    assert rt.generate(PROMPTS, N, sampling=Sampling(temperature=0.0, seed=5), **kw) == greedy
    assert rt.generate(PROMPTS, N, sampling=Sampling(temperature=1.0, top_p=1e-6, seed=5), **kw) == greedy


@pytest.mark.parametrize("mode", ["plain", "influence"])
def test_a_rows_sample_does_not_depend_on_micro_batching(tiny_runtime, small_runtime, mode):
    sampling = Sampling(temperature=1.5, top_p=0.95, seed=11)
    one = tiny_runtime.generate(PROMPTS, N, sampling=sampling, **_modes(tiny_runtime, len(PROMPTS))[mode])
    split = small_runtime.generate(PROMPTS, N, sampling=sampling, **_modes(small_runtime, len(PROMPTS))[mode])
    assert one == split
    first = tiny_runtime.generate(PROMPTS[:1], N, sampling=sampling, **_modes(tiny_runtime, 1)[mode])
    assert first[0] == one[0]  # row 0 alone: same index, same stream


def test_the_sampler_follows_softmax_within_the_nucleus():
    scores = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))[None].repeat(40000, 1)
    u = torch.rand(40000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    freq = torch.bincount(ModelRuntime._sample(scores, u, 1.0, 1.0), minlength=4).double() / 40000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64), atol=0.01, rtol=0)
    # top_p 0.7: the nucleus is {0, 1} (0.5 < 0.7 <= 0.8), renormalised
    freq = torch.bincount(ModelRuntime._sample(scores, u, 1.0, 0.7), minlength=4).double() / 40000
    torch.testing.assert_close(freq, torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64), atol=0.01, rtol=0)
    # temperature 2 flattens: p ∝ sqrt(p)
    flat = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64).sqrt()
    freq = torch.bincount(ModelRuntime._sample(scores, u, 2.0, 1.0), minlength=4).double() / 40000
    torch.testing.assert_close(freq, flat / flat.sum(), atol=0.01, rtol=0)
    # masked (−inf) tokens are never drawn
    masked = scores.clone()
    masked[:, 0] = float("-inf")
    assert 0 not in ModelRuntime._sample(masked, u, 1.0, 1.0).tolist()


def test_the_template_is_filled_once_and_a_blank_context_leaves_the_prompt():
    inf = Influence(["style {prompt} {x}", "  ", "plain"], template="[{context}] {prompt}")
    assert inf.with_context(["q {context}", "p", "r"]) == ["[style {prompt} {x}] q {context}", "p", "[plain] r"]
    picked = Influence(["a", "b", "c"], lam=[1.0, 2.0, 3.0], temperature=0.6).select([2, 0])
    assert picked.contexts == ["c", "a"] and picked.lam.tolist() == [3.0, 1.0] and picked.temperature == 0.6


def test_bad_arguments_are_rejected_with_clear_messages(tiny_runtime):
    rt = tiny_runtime
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        Sampling(temperature=-0.1)
    for top_p in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
            Sampling(temperature=1.0, top_p=top_p)
    with pytest.raises(ValueError, match="seed must be an int"):
        Sampling(seed=1.5)
    with pytest.raises(ValueError, match="influence temperature must be > 0"):
        Influence(["a"], temperature=0.0)
    with pytest.raises(ValueError, match="lacks the {prompt} placeholder"):
        Influence(["a"], template="{context} only")
    with pytest.raises(ValueError, match="lam has 2 values for 3 rows"):
        Influence(["a", "b", "c"], lam=[1.0, 2.0])
    with pytest.raises(ValueError, match="lam must be finite"):
        Influence(["a"], lam=float("nan"))
    with pytest.raises(ValueError, match="2 prompts but influence for 3 rows"):
        rt.generate(PROMPTS[:2], 2, influence=Influence(["a", "b", "c"]))
    steer = Steering({1: torch.zeros(1, rt.hidden_size)}, [1.0])
    with pytest.raises(ValueError, match=r"rows \[0\] are in more than one of steering, head contrast and influence"):
        rt.generate(PROMPTS[:1], 2, steer=steer, influence=Influence(["a"]))
    with pytest.raises(ValueError, match=r"rows \[1\] are in more than one"):
        rt.generate(PROMPTS[:2], 2, contrast=HeadContrast([None, []]), influence=Influence(["a", "b"]))
    with pytest.raises(ValueError, match="influence contexts must be strings"):
        Influence([3])
    with pytest.raises(ValueError, match="sampling must be a Sampling"):
        rt.generate(PROMPTS[:1], 2, sampling={"temperature": 1.0})
