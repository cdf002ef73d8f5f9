"""Sampler logit transforms against their reference formulas, and sampling invariants."""

from __future__ import annotations

import math

import pytest
import torch

from autoglm.engine.sampler import (
    Sampler,
    SamplingRow,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    argmax_rows,
    compute_logprobs,
)

V = 50


def _logits(b: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_repetition_penalty_matches_hf_definition() -> None:
    logits = _logits(2)
    prompt = [[1, 2, 3], [4]]
    output = [[3, 7, 7], []]
    rep = torch.tensor([1.3, 0.8])
    got = apply_penalties(logits, prompt, output, torch.zeros(2), torch.zeros(2), rep)
    want = logits.clone()
    for i in range(2):
        for t in set(prompt[i]) | set(output[i]):
            x = logits[i, t].item()
            want[i, t] = x / rep[i].item() if x > 0 else x * rep[i].item()
    torch.testing.assert_close(got, want)


def test_presence_and_frequency_penalties_match_openai_definition() -> None:
    logits = _logits(2)
    prompt = [[1, 2, 3], [5, 5]]  # prompt tokens are not penalised by presence/frequency
    output = [[3, 7, 7, 7], [9]]
    pres, freq = torch.tensor([0.5, -1.0]), torch.tensor([0.25, 2.0])
    got = apply_penalties(logits, prompt, output, pres, freq, torch.ones(2))
    want = logits.clone()
    for i in range(2):
        for t in set(output[i]):
            c = output[i].count(t)
            want[i, t] -= c * freq[i].item() + pres[i].item()
    torch.testing.assert_close(got, want)
    assert got[0, 1] == logits[0, 1] and got[1, 5] == logits[1, 5]


def test_top_k_keeps_exactly_k_best() -> None:
    logits = _logits(3)
    out = apply_top_k_top_p(logits, torch.tensor([1, 5, 0]), torch.ones(3))
    for i, k in enumerate([1, 5, V]):
        kept = torch.isfinite(out[i]).nonzero().flatten()
        assert set(kept.tolist()) == set(logits[i].topk(k).indices.tolist())
        torch.testing.assert_close(out[i, kept], logits[i, kept])


def test_top_p_keeps_smallest_nucleus() -> None:
    logits = _logits(2)
    p = 0.7
    out = apply_top_k_top_p(logits, torch.zeros(2, dtype=torch.long), torch.tensor([p, 1.0]))
    probs = logits[0].softmax(-1)
    order = probs.argsort(descending=True)
    cum = 0.0
    want = set()
    for t in order.tolist():  # reference: add tokens, best first, until the mass reaches p
        want.add(t)
        cum += probs[t].item()
        if cum >= p:
            break
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == want
    assert torch.isfinite(out[1]).all()


def test_min_p_threshold() -> None:
    logits = _logits(1)
    out = apply_min_p(logits, torch.tensor([0.1]))
    probs = logits.softmax(-1)
    keep = probs >= 0.1 * probs.max()
    assert torch.equal(torch.isfinite(out), keep)


def test_logprobs_are_raw_log_softmax() -> None:
    logits = _logits(2)
    tokens = torch.tensor([3, 4])
    lps = compute_logprobs(logits, tokens, 4)
    ref = logits.log_softmax(-1)
    for i, lp in enumerate(lps):
        assert lp.token_id == tokens[i].item()
        assert math.isclose(lp.logprob, ref[i, tokens[i]].item(), rel_tol=1e-6)
        assert [t for t, _ in lp.top] == ref[i].topk(4).indices.tolist()


def _row(**kw: object) -> SamplingRow:
    seed = kw.pop("seed", None)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None  # type: ignore[arg-type]
    return SamplingRow(generator=gen, **kw)  # type: ignore[arg-type]


def test_greedy_and_top_k_1_equal_argmax() -> None:
    logits = _logits(3)
    tokens, _ = Sampler()(logits, [_row(temperature=0.0), _row(temperature=1.5, top_k=1, seed=1),
                                   _row(temperature=0.0, top_k=7)])
    assert tokens == logits.argmax(-1).tolist()


def test_argmax_rows_is_torch_argmax_with_ties_and_nan() -> None:
    x = torch.randn(5, 1000)
    x[1, 10] = x[1, 700] = 50.0  # a tie: the first index wins
    x[2, 3] = float("nan")  # NaN counts as the maximum
    x[3, :] = -float("inf")
    x[4, 999] = float("inf")
    got = argmax_rows(x)
    assert got.dtype == torch.long and torch.equal(got, x.argmax(-1))
    assert got.tolist()[1:3] == [10, 3]
    assert torch.equal(argmax_rows(x.t().contiguous().t()), x.argmax(-1))  # a strided view
    assert torch.equal(argmax_rows(x.double()), x.double().argmax(-1))  # other dtypes: torch's own


def test_argmax_rows_as_a_list_is_torch_argmax() -> None:
    # the sampler's all-greedy fast path returns argmax_rows(...).tolist()
    x = torch.randn(5, 1000)
    x[1, 10] = x[1, 700] = 50.0
    x[2, 3] = float("nan")
    x[3, :] = -float("inf")
    for y in (x, x.t().contiguous().t(), x.double()):
        assert argmax_rows(y).tolist() == x.argmax(-1).tolist()


def test_plain_greedy_rows_take_the_general_paths_tokens() -> None:
    """An all-greedy batch with nothing to transform takes the argmax alone; each row's token is the one the full
    path picks for it when that path runs (a logprobs row in the batch), including ties and NaN rows."""
    logits = _logits(4)
    logits[1, 5] = logits[1, 9] = 99.0
    logits[2, 7] = float("nan")
    plain, lps = Sampler()(logits, [_row(temperature=0.0) for _ in range(4)])
    assert lps == [None] * 4
    full, _ = Sampler()(logits, [_row(temperature=0.0) for _ in range(3)] + [_row(temperature=0.0, logprobs=2)])
    assert plain == full == logits.argmax(-1).tolist()
    assert plain[1:3] == [5, 7]
    # any setting that changes the pick leaves the fast path
    biased, _ = Sampler()(logits, [_row(temperature=0.0, logit_bias={3: 500.0})] + [_row(temperature=0.0)] * 3)
    assert biased[0] == 3 and biased[1:] == plain[1:]
    penal, _ = Sampler()(logits[:1], [_row(temperature=0.0, repetition_penalty=1e9, output_token_ids=[plain[0]])])
    assert penal != plain[:1]


def test_same_seed_same_tokens_regardless_of_batch_mates() -> None:
    sampler = Sampler()
    logits = _logits(4, seed=3)
    alone = [sampler(logits[:1], [_row(temperature=1.0, seed=42)])[0][0] for _ in range(1)]
    seq_alone = []
    gen_row = _row(temperature=1.0, seed=42)
    for _ in range(20):
        seq_alone.append(sampler(logits[:1], [gen_row])[0][0])
    # same request, now with different batch mates every step
    row = _row(temperature=1.0, seed=42)
    seq_batched = []
    for step in range(20):
        mates = [_row(temperature=0.7, top_p=0.9, seed=step), _row(temperature=0.0)]
        toks, _ = sampler(torch.cat([logits[1:3], logits[:1]]), [*mates, row])
        seq_batched.append(toks[2])
    assert seq_alone == seq_batched
    assert seq_alone[0] == alone[0]
    assert len(set(seq_alone)) > 1  # really sampling


def test_sampling_follows_distribution() -> None:
    logits = torch.tensor([[0.0, math.log(3.0), -1e9]])
    row = _row(temperature=1.0, seed=0)
    counts = [0, 0, 0]
    for _ in range(2000):
        counts[Sampler()(logits, [row])[0][0]] += 1
    assert counts[2] == 0
    assert abs(counts[1] / 2000 - 0.75) < 0.04


def test_penalties_change_sampled_greedy_token() -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    toks, _ = Sampler()(logits, [_row(temperature=0.0, frequency_penalty=2.0, output_token_ids=[0])])
    assert toks == [1]
    toks, _ = Sampler()(logits, [_row(temperature=0.0, repetition_penalty=1.5, prompt_token_ids=[0])])
    assert toks == [1]  # 5 / 1.5 < 4


@pytest.mark.parametrize("k", [0, 3])
def test_logprobs_per_row(k: int) -> None:
    logits = _logits(2)
    toks, lps = Sampler()(logits, [_row(temperature=0.0, logprobs=k), _row(temperature=0.0)])
    assert lps[1] is None and lps[0] is not None and len(lps[0].top) == k
    assert lps[0].token_id == toks[0]


def test_logit_bias_is_added_per_row_before_sampling() -> None:
    logits = _logits(3, seed=4)
    best = logits.argmax(-1).tolist()
    raw = logits.clone()
    rows = [
        _row(temperature=0.0, logit_bias={best[0]: -100.0}),  # banned: the runner-up wins
        _row(temperature=0.0),  # batch mate without a bias: untouched
        _row(temperature=0.0, logit_bias={7: 100.0}),  # forced
    ]
    toks, lps = Sampler()(logits, rows)
    assert toks == [int(logits[0].topk(2).indices[1]), best[1], 7]
    assert torch.equal(logits, raw)  # the caller's logits are not modified
    # OpenAI reports logprobs of the model's distribution (as vLLM): the bias does not enter them
    _, lp = Sampler()(logits[1:2], [_row(temperature=0.0, logprobs=0, logit_bias={3: 5.0})])
    assert lp[0] is not None and lp[0].logprob == pytest.approx(float(torch.log_softmax(logits[1], -1)[best[1]]))
