"""Perplexity against a hand-computed value."""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_compress import perplexity


class FixedBigram(nn.Module):
    """A 'model' whose next-token distribution depends only on the current token."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, use_cache=False):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_perplexity_matches_hand_computation():
    # Vocabulary of 3. From token 0 the model predicts [0.5, 0.25, 0.25]; from 1, [0.1, 0.8, 0.1];
    # from 2, uniform. Windows [0, 1, 1] and [2, 0, 2] give predictions:
    #   0->1: 0.25, 1->1: 0.8, 2->0: 1/3, 0->2: 0.25
    table = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]))
    result = perplexity(FixedBigram(table), torch.tensor([[0, 1, 1], [2, 0, 2]]), batch_size=1)
    expected_nll = -(math.log(0.25) + math.log(0.8) + math.log(1 / 3) + math.log(0.25)) / 4
    assert result.tokens == 4 and result.windows == 2
    assert math.isclose(result.nll, expected_nll, rel_tol=1e-6)
    assert math.isclose(result.perplexity, math.exp(expected_nll), rel_tol=1e-6)


def test_next_token_nll_in_row_chunks_equals_cross_entropy():
    """The NLL is summed a few positions at a time through one float32 buffer (no full-vocabulary copies):
    chunk boundaries inside and across windows, bf16 logits, change nothing but float rounding."""
    from torch.nn import functional as F

    from moe_compress.evaluate.lm_perplexity import next_token_nll

    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 10, 50, generator=generator) * 4).to(torch.bfloat16)
    batch = torch.randint(0, 50, (3, 10), generator=generator)
    expected = float(F.cross_entropy(logits[:, :-1].float().reshape(-1, 50), batch[:, 1:].reshape(-1), reduction="sum"))
    for rows in (1, 4, 9, 256):
        total, predictions = next_token_nll(logits, batch, rows=rows)
        assert predictions == 27 and math.isclose(total, expected, rel_tol=1e-6)
