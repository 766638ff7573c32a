"""Scoring with shared prefixes: sequences with the same context run it once, with the same log-probabilities."""

import pytest
import torch

from steerstore.operators.runtime import Encoded, ModelConfig, ModelRuntime
from steerstore.operators.runtime.scoring import prefix_groups
from tests.tiny import tiny_model, tiny_tokenizer

CONTEXT_A = "Earlier responses written by this user: the garden was quiet in the morning light and the river ran " * 2
CONTEXT_B = "Earlier responses written by this user: coffee at the market before the long winter walk home " * 2


def _runtime(model_type="llama", max_batch_tokens=8192):
    return ModelRuntime(ModelConfig(name_or_path=f"tiny-{model_type}", max_batch_tokens=max_batch_tokens),
                        model=tiny_model(model_type), tokenizer=tiny_tokenizer())


def _encoded(rt):
    prompts = [CONTEXT_A + "Prompt: a letter", CONTEXT_A + "Prompt: the city at night", CONTEXT_B + "Prompt: music",
               CONTEXT_A + "Prompt: ocean", "Prompt: alone", CONTEXT_B + "Prompt: a small paper window"]
    responses = ["dear friend, the road", "bright and green", "careful simple notes", "a mountain road",
                 "just this", "story of a window"]
    return rt.encode(prompts, responses)


def test_prefix_groups_put_sequences_with_a_common_context_together():
    seqs = [Encoded([1, 2, 3, 4, 5, 6, 7, 8], 6), Encoded([9, 9, 9, 9, 9], 3), Encoded([1, 2, 3, 4, 5, 7, 7], 6),
            Encoded([1, 2, 3, 4, 6, 1, 1], 5), Encoded([1, 2, 3, 4, 5, 6, 9], 4)]
    groups = prefix_groups(seqs, min_shared=3)
    by_member = {i: shared for shared, members in groups for i in members}
    members = sorted(sorted(m) for _, m in groups)
    assert [0, 2, 3, 4] in members or [0, 2, 4] in members
    # the prefix ends before each member's last prompt token: sequence 4's prompt is 4 tokens long
    assert by_member[4] <= 3 and by_member[1] == 0
    for shared, group in groups:
        assert all(seqs[i].ids[:shared] == seqs[group[0]].ids[:shared] for i in group)
        assert all(shared <= seqs[i].prompt_len - 1 for i in group) or shared == 0
    assert all(shared == 0 for shared, _ in prefix_groups(seqs, min_shared=100))


@pytest.mark.parametrize("model_type,budget", [("llama", 8192), ("llama", 200), ("qwen2", 8192), ("mistral", 8192)])
def test_shared_prefix_scoring_equals_scoring_each_sequence_whole(model_type, budget):
    rt = _runtime(model_type, budget)
    enc = _encoded(rt)
    groups = prefix_groups(enc, min_shared=16)
    assert sum(len(m) for s, m in groups if s) >= 4, "the test sequences must share contexts"
    whole = rt.token_logprobs(enc, min_shared=0)
    shared = rt.token_logprobs(enc, min_shared=16)
    for i, (a, b) in enumerate(zip(whole, shared)):
        assert a.shape == b.shape == (len(enc[i].ids) - enc[i].prompt_len,)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=f"sequence {i}")


def test_shared_prefixes_are_run_once():
    from steerstore.jobs.bench.cost import BlockCounter

    rt = _runtime()
    enc = _encoded(rt)
    counts = {}
    for min_shared in (0, 16):
        counter = BlockCounter(rt)
        with counter, counter.at("scoring"):
            rt.token_logprobs(enc, min_shared=min_shared)
        counts[min_shared] = counter.figures()["scoring"]["forward_tokens"]
    groups = prefix_groups(enc, min_shared=16)
    saved = sum((len(m) - 1) * s for s, m in groups)
    assert saved > 0
    # unpadded work: every token once, minus the shared prefixes' repeats (padding only adds to the plain run)
    assert counts[16] <= sum(len(e.ids) for e in enc) - saved + 40
    assert counts[16] < counts[0] - saved / 2


@pytest.mark.parametrize("model_type,budget", [("llama", 8192), ("llama", 200), ("qwen2", 8192)])
def test_steered_scoring_with_shared_prefixes_equals_scoring_each_row_whole(model_type, budget):
    """One prompt under many steering candidates (the recommendation's rows): rows steered from their response on
    share the prompt's unsteered prefix; a row steered everywhere, and an unsteered one, come out the same too."""
    import numpy as np

    from steerstore.jobs.bench.cost import BlockCounter
    from steerstore.operators.runtime import Steering

    rt = _runtime(model_type, budget)
    prompts = [CONTEXT_A + "Prompt: a letter"] * 4 + [CONTEXT_B + "Prompt: music"] * 3 + ["Prompt: alone"]
    responses = ["dear friend, the road"] * 4 + ["careful simple notes"] * 3 + ["just this"]
    g = np.random.default_rng(5)
    vectors = {l: torch.as_tensor(g.standard_normal((8, rt.hidden_size)), dtype=torch.float32) for l in (1, 2)}
    scales = torch.tensor([0.0, 1.0, 4.0, 2.0, 3.0, 0.5, 2.0, 1.0])
    positions = ["response", "response", "response", "all", "response", "response", "all", "response"]
    steer = Steering(vectors, scales, positions)
    whole, n = rt.response_logprobs(prompts, responses, steer)
    shared, n2 = rt.response_logprobs(prompts, responses, steer, min_shared=16)
    torch.testing.assert_close(shared, whole, rtol=1e-4, atol=1e-3)
    assert n.tolist() == n2.tolist()
    # each row alone, steered by its own row: the batch changes nothing
    for i in range(len(prompts)):
        alone, _ = rt.response_logprobs([prompts[i]], [responses[i]], steer.select([i]))
        assert float(alone[0]) == pytest.approx(float(whole[i]), abs=1e-3)
    assert len(set(np.round(whole[:4].numpy(), 3))) == 4  # the candidates differ: steering reached the response
    plain, _ = rt.response_logprobs(prompts, responses, min_shared=16)
    torch.testing.assert_close(plain, rt.response_logprobs(prompts, responses)[0], rtol=1e-4, atol=1e-3)
    # and the shared prefixes ran once: fewer block-tokens than scoring every row whole
    counts = {}
    for min_shared in (0, 16):
        counter = BlockCounter(rt)
        with counter, counter.at("scoring"):
            rt.response_logprobs(prompts, responses, steer, min_shared=min_shared)
        counts[min_shared] = counter.figures()["scoring"]["forward_tokens"]
    assert counts[16] < 0.75 * counts[0], counts
