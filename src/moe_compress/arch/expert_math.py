"""One routed expert's output f_e(x), computed from the fused 3-D expert weights.

transformers 5 stores experts as fused tensors and describes their layout with flags set by
`use_experts_implementation` (transposed weights, biases, gated or not, the family's own
`_apply_gate`). Reading those flags gives a single expert forward for every family, which the
observer needs to measure expert outputs on exactly the tokens routed to each expert.
"""

from __future__ import annotations

import torch
from torch import nn


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ weight if transposed else x @ weight.T
    return out if bias is None else out + bias


def expert_forward(experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """f_e(x) before gating for tokens `x` of shape [N, H]; returns [N, H]."""
    transposed = getattr(experts, "is_transposed", False)
    has_bias = getattr(experts, "has_bias", False)
    if getattr(experts, "has_gate", True):
        bias = experts.gate_up_proj_bias[expert] if has_bias else None
        hidden = experts._apply_gate(_project(x, experts.gate_up_proj[expert], bias, transposed))
    else:
        bias = experts.up_proj_bias[expert] if has_bias else None
        hidden = experts.act_fn(_project(x, experts.up_proj[expert], bias, transposed))
    bias = experts.down_proj_bias[expert] if has_bias else None
    out = _project(hidden, experts.down_proj[expert], bias, transposed)
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    return out
