"""Attention-head gating, exact batched ablation, attribution and differential decoding in the runtime."""

import pytest
import torch

from steerstore.operators.runtime import HeadContrast, ModelConfig, ModelRuntime
from tests.tiny import tiny_model, tiny_tokenizer

PROMPTS = ["Tell me about the weather today, please.", "Hi there", "Summarise the plot of a novel in one sentence."]
RESPONSES = ["Wow, I love it! Amazing.", "Noted. The answer is brief and formal.", "The fox jumps."]


def _runtime(model_type="llama", max_batch_tokens=8192):
    return ModelRuntime(ModelConfig(name_or_path=f"tiny-{model_type}", max_batch_tokens=max_batch_tokens),
                        model=tiny_model(model_type), tokenizer=tiny_tokenizer())


def _manual_nll(rt, enc, layer=None, head=None, zero_layer_attention=None):
    """−log p(response) computed by hand: a hook that rebuilds o_proj from a masked input."""
    handles = []
    if layer is not None:
        proj = rt.layers[layer].self_attn.o_proj

        def replace(_m, args, output):
            x = args[0].clone()
            x[..., head * rt.head_dim:(head + 1) * rt.head_dim] = 0
            return torch.nn.functional.linear(x, proj.weight, proj.bias)
        handles.append(proj.register_forward_hook(replace))
    if zero_layer_attention is not None:
        handles.append(rt.layers[zero_layer_attention].self_attn.register_forward_hook(
            lambda _m, _a, out: (torch.zeros_like(out[0]), *out[1:])))
    try:
        with torch.no_grad():
            logits = rt.model(input_ids=torch.tensor([enc.ids])).logits[0].float()
    finally:
        for h in handles:
            h.remove()
    logp = torch.log_softmax(logits[enc.prompt_len - 1:-1], -1)
    return -logp.gather(-1, torch.tensor(enc.ids[enc.prompt_len:])[:, None]).sum().double()


def test_ablating_one_head_equals_a_manual_computation(tiny_runtime):
    rt = tiny_runtime
    enc = rt.encode(PROMPTS, RESPONSES)
    gates = rt.head_gates([[(1, 2)]] * len(enc))
    got = rt.sequence_nll(enc, gates)
    for i, e in enumerate(enc):
        torch.testing.assert_close(got[i], _manual_nll(rt, e, layer=1, head=2), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, rt.sequence_nll(enc)), "ablating a head changed nothing"


def test_ablating_every_head_of_a_layer_removes_its_attention_output(tiny_runtime):
    rt = tiny_runtime
    enc = rt.encode(PROMPTS, RESPONSES)
    all_heads = [(2, h) for h in range(rt.num_heads)]
    got = rt.sequence_nll(enc, rt.head_gates([all_heads] * len(enc)))
    for i, e in enumerate(enc):
        # o_proj has no bias in llama, so zero input == zero attention output
        torch.testing.assert_close(got[i], _manual_nll(rt, e, zero_layer_attention=2), rtol=1e-4, atol=1e-4)


def test_per_row_head_sets_in_one_batch_equal_separate_runs(tiny_runtime):
    rt = tiny_runtime
    enc = rt.encode(PROMPTS, RESPONSES)
    sets = [[(0, 1)], [(3, 0), (1, 3)], []]
    batched = rt.sequence_nll(enc, rt.head_gates(sets))
    for i in range(len(enc)):
        alone = rt.sequence_nll(enc[i:i + 1], rt.head_gates(sets[i:i + 1]))
        torch.testing.assert_close(batched[i], alone[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type,budget", [("llama", 8192), ("llama", 96), ("qwen2", 8192), ("mistral", 300)])
def test_batched_forked_ablation_equals_a_per_head_loop(model_type, budget):
    rt = _runtime(model_type, budget)
    enc = rt.encode(PROMPTS, RESPONSES)
    heads = [(l, h) for l in range(rt.num_layers) for h in range(rt.num_heads)]
    base, ablated = rt.ablation_nll(enc, heads)
    torch.testing.assert_close(base, rt.sequence_nll(enc), rtol=1e-5, atol=1e-4)
    assert (ablated - base).abs().max() > 0.1, "no ablation changed the NLL"
    for i, head in enumerate(heads):
        loop = rt.sequence_nll(enc, rt.head_gates([[head]] * len(enc)))
        torch.testing.assert_close(ablated[i], loop, rtol=1e-5, atol=1e-4, msg=f"head {head}")


def test_forked_ablation_runs_the_blocks_below_a_chunk_once_per_micro_batch():
    """Later chunks of variants start from the unablated hidden states cached at their first fork."""
    rt = _runtime("llama", 96)
    enc = rt.encode(PROMPTS, RESPONSES)
    heads = [(l, h) for l in (1, 2, 3) for h in range(rt.num_heads)]
    calls = {l: 0 for l in range(rt.num_layers)}
    handles = [rt.layers[l].register_forward_hook(lambda m, a, o, l=l: calls.__setitem__(l, calls[l] + 1))
               for l in range(rt.num_layers)]
    try:
        base, ablated = rt.ablation_nll(enc, heads)
    finally:
        for h in handles:
            h.remove()
    batches = rt.micro_batches([len(e.ids) for e in enc], budget=max(1, 96 // 8))
    assert calls[0] == len(batches), "block 0 (below every fork) must run once per base micro-batch"
    assert calls[3] > calls[1] > calls[0], "blocks with forks run once per chunk"
    assert all(isinstance(block, torch.nn.Module) and type(block).__name__ != "_Skipped" for block in rt.layers)
    for i, head in enumerate(heads):
        torch.testing.assert_close(ablated[i], rt.sequence_nll(enc, rt.head_gates([[head]] * len(enc))),
                                   rtol=1e-5, atol=1e-4)


def test_forked_ablation_of_a_subset_in_any_order(tiny_runtime):
    rt = tiny_runtime
    enc = rt.encode(PROMPTS[:2], RESPONSES[:2])
    heads = [(3, 1), (0, 0), (2, 3)]
    _, ablated = rt.ablation_nll(enc, heads)
    for i, head in enumerate(heads):
        torch.testing.assert_close(ablated[i], rt.sequence_nll(enc, rt.head_gates([[head]] * 2)), rtol=1e-5, atol=1e-4)


def test_attribution_is_the_gradient_of_the_mean_nll_per_group(tiny_runtime):
    rt = tiny_runtime
    enc = rt.encode(PROMPTS, RESPONSES)
    groups = [0, 1, 0]
    grads = rt.head_attribution(enc, groups, 2)
    assert grads.shape == (2, rt.num_layers, rt.num_heads)
    # finite differences of the pooled mean NLL of group 0 for one gate
    tokens = sum(len(e.ids) - e.prompt_len for e, g in zip(enc, groups) if g == 0)
    eps = 1e-3
    members = [e for e, g in zip(enc, groups) if g == 0]

    def mean_nll(value):
        gates = torch.ones((len(members), rt.num_layers, rt.num_heads))
        gates[:, 1, 2] = value
        return float(rt.sequence_nll(members, gates).sum()) / tokens
    fd = (mean_nll(1 + eps) - mean_nll(1 - eps)) / (2 * eps)
    assert grads[0, 1, 2].item() == pytest.approx(fd, rel=2e-2, abs=1e-4)


def test_attribution_cuts_its_micro_batches_by_the_backward_budget_with_the_same_gradients(tiny_runtime):
    from steerstore.jobs.bench.cost import BlockCounter

    rt = tiny_runtime
    enc = rt.encode(PROMPTS, RESPONSES)
    whole = rt.head_attribution(enc, [0, 1, 0], 2)
    saved = rt.config.max_backward_tokens
    rt.config.max_backward_tokens = 1  # below every sequence: one sequence per micro-batch
    try:
        with BlockCounter(rt) as counter, counter.at("attribution"):
            split = rt.head_attribution(enc, [0, 1, 0], 2)
    finally:
        rt.config.max_backward_tokens = saved
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-7)
    # each sequence alone: no padding, so the blocks saw exactly the sequences' own tokens
    assert counter.counts["attribution"]["forward_block_tokens"] == sum(len(e.ids) for e in enc) * rt.num_layers


def test_contrast_decoding_with_gamma_zero_equals_greedy(tiny_runtime):
    rt = tiny_runtime
    plain = rt.generate(PROMPTS, max_new_tokens=12)
    for prefill in ("shared", "separate"):
        contrast = HeadContrast([[(1, 0), (2, 3)], [(0, 2)], []], gamma=0.0, prefill=prefill)
        assert rt.generate(PROMPTS, max_new_tokens=12, contrast=contrast) == plain


def test_contrast_decoding_per_row_head_sets_equal_separate_runs(tiny_runtime):
    rt = tiny_runtime
    contrast = HeadContrast([[(1, 0), (2, 3)], [(0, 2), (3, 1)], [(1, 1)]], gamma=[2.0, 1.0, 3.0], plausibility=0.0)
    batched = rt.generate(PROMPTS, max_new_tokens=12, contrast=contrast)
    alone = [rt.generate(PROMPTS[i:i + 1], max_new_tokens=12, contrast=contrast.select([i]))[0]
             for i in range(len(PROMPTS))]
    assert batched == alone
    assert batched != rt.generate(PROMPTS, max_new_tokens=12), "a strong contrast changed nothing"


def test_shared_prefill_matches_a_masked_branch_that_sees_the_unablated_prompt(tiny_runtime):
    """Shared prefill: the masked branch's prompt is the full model's; its own steps are ablated."""
    rt = tiny_runtime
    contrast = HeadContrast([[(1, 0), (2, 3)]], gamma=1.5, plausibility=0.0, prefill="shared")
    got = rt.generate(PROMPTS[:1], max_new_tokens=6, contrast=contrast)[0]
    # reference without caches: recompute both branches from scratch at every step
    ids = rt.prompt_ids(PROMPTS[:1])[0]
    n = len(ids)
    gate_all = rt.head_gates([[(1, 0), (2, 3)]])
    out = []
    for _ in range(6):
        x = torch.tensor([ids])
        with torch.no_grad():
            full = torch.log_softmax(rt.model(input_ids=x).logits[0, -1].float(), -1)
            # masked branch: prompt positions but the last unablated, later positions ablated
            # (exactly what a copied prefill cache gives): gate only rows' positions >= n - 1
            proj_hooks = []
            for layer in (1, 2):
                def fn(_m, args, layer=layer):
                    x_in = args[0].clone()
                    b, s, _ = x_in.shape
                    v = x_in.view(b, s, rt.num_heads, rt.head_dim)
                    v[:, n - 1:] = v[:, n - 1:] * gate_all[0, layer][None, None, :, None]
                    return (v.view(b, s, -1),)
                proj_hooks.append(rt.layers[layer].self_attn.o_proj.register_forward_pre_hook(fn))
            try:
                masked = torch.log_softmax(rt.model(input_ids=x).logits[0, -1].float(), -1)
            finally:
                for h in proj_hooks:
                    h.remove()
        nxt = int(((1 + 1.5) * full - 1.5 * masked).argmax())
        if nxt in rt.eos_token_ids:
            break
        out.append(nxt)
        ids = ids + [nxt]
    assert got == rt.tokenizer.decode(out, skip_special_tokens=True)


def test_bad_heads_are_rejected_with_the_model_shape(tiny_runtime):
    with pytest.raises(ValueError, match="query heads 0..3"):
        tiny_runtime.head_gates([[(0, 9)]])
    with pytest.raises(ValueError, match="more than one of steering, head contrast and influence"):
        from steerstore.operators.runtime import Steering
        steer = Steering({1: torch.zeros(1, tiny_runtime.hidden_size)}, [1.0])
        tiny_runtime.generate(PROMPTS[:1], 2, steer=steer, contrast=HeadContrast([[]]))
