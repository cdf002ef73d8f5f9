"""The sampler's per-row token bitmask (structured outputs): only allowed tokens are drawn, free rows are untouched."""

from __future__ import annotations

import torch

from autoglm.engine.grammar import allocate_token_bitmask, bitmask_width
from autoglm.engine.sampler import Sampler, SamplingRow, apply_token_bitmask

V = 100  # not a multiple of 32: the last word is partly outside the vocabulary


def _bitmask(allowed: list[set[int]]) -> torch.Tensor:
    """Reference packing: bit t % 32 of word t // 32."""
    words = torch.zeros(len(allowed), bitmask_width(V), dtype=torch.int64)
    for r, ids in enumerate(allowed):
        for t in ids:
            words[r, t // 32] |= 1 << (t % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _logits(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_apply_token_bitmask_matches_the_bit_layout() -> None:
    g = torch.Generator().manual_seed(1)
    allowed = [set(torch.randperm(V, generator=g)[:k].tolist()) for k in (1, 7, 31, 32, 33, V)]
    logits = _logits(len(allowed))
    got = apply_token_bitmask(logits, _bitmask(allowed))
    for r, ids in enumerate(allowed):
        keep = torch.tensor([t in ids for t in range(V)])
        torch.testing.assert_close(got[r][keep], logits[r][keep])
        assert torch.isneginf(got[r][~keep]).all()


def test_an_all_ones_bitmask_changes_nothing() -> None:
    logits = _logits(2)
    torch.testing.assert_close(apply_token_bitmask(logits, allocate_token_bitmask(2, V)), logits)


def test_greedy_row_takes_the_best_allowed_token() -> None:
    logits = _logits(1)
    best = int(logits[0].argmax())
    allowed = {t for t in range(V) if t != best and t % 3 == 0}
    tokens, _ = Sampler()(logits, [SamplingRow(temperature=0.0, token_bitmask=_bitmask([allowed])[0])])
    assert tokens[0] == max(allowed, key=lambda t: float(logits[0, t]))


def test_sampled_tokens_are_always_allowed_and_free_rows_are_unchanged() -> None:
    allowed = {3, 17, 40, 99}
    mask = _bitmask([allowed])[0]
    sampler = Sampler()
    for seed in range(40):
        logits = _logits(2, seed)
        rows = [SamplingRow(temperature=1.5, top_k=50, repetition_penalty=1.2, output_token_ids=[3, 3],
                            generator=torch.Generator().manual_seed(seed), token_bitmask=mask),
                SamplingRow(temperature=1.0, generator=torch.Generator().manual_seed(1000 + seed))]
        tokens, _ = sampler(logits, rows)
        assert tokens[0] in allowed
        free = SamplingRow(temperature=1.0, generator=torch.Generator().manual_seed(1000 + seed))
        alone, _ = sampler(logits[1:], [free])
        assert tokens[1] == alone[0]  # a constrained batch mate does not move a free row's draw


def test_a_single_allowed_token_is_forced() -> None:
    tokens, _ = Sampler()(_logits(1), [SamplingRow(temperature=1.0, top_p=0.5, token_bitmask=_bitmask([{42}])[0])])
    assert tokens == [42]
