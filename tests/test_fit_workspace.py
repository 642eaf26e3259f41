"""fit's measurement writes its log-probabilities and KL products into reused blocks (`fitting.workspace`) for speed;
every figure must stay the very float the straightforward expressions give, or a race's decisions would move."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from moe_compress.fitting.measure import Reference, next_token_log_probs
from moe_compress.fitting.race import slice_bounds
from moe_compress.fitting.simulate import simulate
from moe_compress.fitting.workspace import Workspace
from moe_compress.source.load import load_model
from moe_compress.stages.quantize import Quantize
from moe_compress.stages.sizes import checkpoint_sizes
from tiny_checkpoints import save_tiny_checkpoint


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_log_probs_in_the_workspace_are_next_token_log_probs(dtype):
    """Larger, then smaller, then larger batches through one workspace: each the floats of `next_token_log_probs`."""
    generator, workspace = torch.Generator().manual_seed(1), Workspace()
    for windows in (3, 1, 5, 2):
        logits = (4 * torch.randn(windows, 19, 301, generator=generator)).to(dtype)
        expected = next_token_log_probs(logits)
        assert torch.equal(workspace.log_probs(logits), expected) and torch.equal(workspace.log_probs(logits, keep=True), expected)


def test_the_workspaces_kl_is_kl_div_bit_for_bit():
    generator, workspace = torch.Generator().manual_seed(5), Workspace()
    original = torch.log_softmax(3 * torch.randn(4, 17, 301, generator=generator), -1)
    probs = original.exp()
    for window in range(4):
        mine = torch.log_softmax(original[window] + 0.05 * torch.randn(17, 301, generator=generator), -1)
        expected = float(F.kl_div(mine, original[window], log_target=True, reduction="sum"))
        assert workspace.kl(probs[window], original[window], mine) == expected == float((probs[window] * (original[window] - mine)).sum())


def test_window_scores_are_the_straightforward_computations_floats(tmp_path):
    """Every window's KL, top-1 agreements and both negative log-likelihoods, from the workspace path (the original's side
    kept), equal -- as floats, not approximately -- those of a forward per batch, `F.log_softmax` to float32 and
    `F.kl_div`, computed with nothing reused; twice, so that the second candidate reads blocks the first one wrote."""
    source = save_tiny_checkpoint(tmp_path / "source", "mixtral")
    original, _ = load_model(str(source))
    windows = torch.randint(0, 300, (12, 24), generator=torch.Generator().manual_seed(3))
    reference = Reference.of(original, windows, slice_bounds(12, 3))
    assert reference.sides is not None and [b.shape[0] for b in reference.batches] == [3, 3, 6]
    for bits in (4, 8):
        candidate = copy.deepcopy(original)
        simulate(candidate, Quantize(bits=bits, scope="experts"), checkpoint_sizes(source).group_size)
        scores = reference.scores(candidate, original)
        expected: dict[str, list] = {"kl": [], "agree": [], "nll": [], "nll_reference": []}
        with torch.no_grad():
            for batch in reference.batches:
                mine, theirs = (F.log_softmax(m(input_ids=batch, use_cache=False).logits[:, :-1], -1, dtype=torch.float32) for m in (candidate, original))
                targets = batch[:, 1:, None]
                expected["kl"] += [float(F.kl_div(mine[w], theirs[w], log_target=True, reduction="sum")) for w in range(batch.shape[0])]
                expected["agree"] += (mine.argmax(-1) == theirs.argmax(-1)).sum(-1).tolist()
                expected["nll"] += (-mine.gather(-1, targets).sum((1, 2))).tolist()
                expected["nll_reference"] += (-theirs.gather(-1, targets).sum((1, 2))).tolist()
        assert {name: getattr(scores, name) for name in expected} == expected and min(expected["kl"]) > 0
