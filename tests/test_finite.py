"""NaN and Inf are refused wherever numbers enter, with the tensor, statistic or option named."""

from __future__ import annotations

import pytest
import torch

from helpers import token_batches
from moe_compress import MoECompressError, compress, finetune, load_model
from tiny_checkpoints import save_tiny_checkpoint
from tiny_models import tiny_model


def test_nan_weights_in_a_checkpoint_are_refused(tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "tiny")
    model, tokenizer = load_model(checkpoint)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[3, 0, 0] = float("nan")
    model.save_pretrained(tmp_path / "poisoned")
    tokenizer.save_pretrained(tmp_path / "poisoned")
    with pytest.raises(MoECompressError, match=r"weight model\.layers\.1\.mlp\.experts\.down_proj of .*poisoned contains 1 NaN/Inf"):
        load_model(tmp_path / "poisoned")


def test_inf_weights_of_an_in_memory_model_are_refused():
    model = tiny_model("mixtral")
    with torch.no_grad():
        model.model.layers[2].mlp.gate.weight[0, 0] = float("inf")
    with pytest.raises(MoECompressError, match=r"weight model\.layers\.2\.mlp\.gate\.weight of the model contains 1 NaN/Inf"):
        compress(model, method="reap", ratio=0.25, calib=token_batches(), cache_dir=False)


def test_statistics_that_overflow_are_refused():
    """Finite but huge expert weights overflow float32 on the way: the statistics are Inf/NaN."""
    model = tiny_model("mixtral")
    with torch.no_grad():
        model.model.layers[0].mlp.experts.gate_up_proj.fill_(1e30)
    with pytest.raises(MoECompressError, match="statistic 'reap_(prob_)?sum' of MoE layer 0 has .* NaN/Inf"):
        compress(model, method="reap", ratio=0.25, calib=token_batches(), cache_dir=False, options={"protect_super_experts": False})


@pytest.mark.parametrize("lr", [float("nan"), float("inf")])
def test_a_non_finite_learning_rate_is_refused(lr):
    with pytest.raises(MoECompressError, match="learning rate .* must be a finite number"):
        finetune(tiny_model("qwen2_moe"), None, lr=lr)


def test_matrix_peaks_by_hand():
    """Max |value| per matrix, NaN wherever one holds a NaN, Inf kept; one figure for a vector or a matrix."""
    import math

    from moe_compress.finite import matrix_peaks

    matrix = torch.tensor([[0.5, -3.0], [2.0, 1.0]], dtype=torch.bfloat16)
    assert matrix_peaks(matrix) == [3.0] and matrix_peaks(torch.tensor([-0.25, 0.125])) == [0.25]
    assert matrix_peaks(torch.tensor([[1.0, float("-inf")]])) == [math.inf]
    for position in ((0, 0), (1, 1)):  # NaN as the first or the last value: aminmax's low, high or both
        poisoned = matrix.clone()
        poisoned[position] = float("nan")
        assert math.isnan(matrix_peaks(poisoned)[0])
    stack = torch.stack([matrix, matrix * 2, torch.zeros(2, 2, dtype=torch.bfloat16)])
    assert matrix_peaks(stack) == [3.0, 6.0, 0.0]
    assert matrix_peaks(torch.tensor([[1, 2]])) is None and matrix_peaks(torch.empty(0, 3)) is None
