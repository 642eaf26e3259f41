"""What rounding an expert's weights to 8 or 4 bits does to its output, observed on its routed tokens.

`fit` prices every (experts kept, bit width) choice of a MoE layer before running any; its bit
width half is this statistic. For each routed (token, expert) pair it runs the expert twice in
float32 -- with its weights as stored, and with each Linear weight round-to-nearest quantised the
way `slimming.quantize` writes it (min-max per group of `group` input columns along each output
row, symmetric, the scale kept in the weight's dtype; compressed-tensors' own `calculate_qparams`
and `fake_quantize`) -- and sums the applied gate squared times the squared output difference:

    rtn_output_error[e, b] = sum over t in T_e of  w_{t,e}^2 ||f_e^{Q_b}(x_t) - f_e(x_t)||^2

which is the part of the layer's squared output error that expert e's rounding adds (its
`f_e` enters the layer's output as w_{t,e} f_e(x_t)). Exact for this calibration, not a
diagonal or Hessian estimate: the rounded expert runs on the real routed inputs.

Memory: one layer's rounded experts (each bit width, the weights' dtype) are kept while that
layer is calibrated -- the walk holds one decoder layer, so this adds two copies of one layer's
routed experts -- and dropped when the next layer's experts arrive.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..arch.expert_math import expert_forward
from .routed_batch import RoutedBatch

#: The bit widths the statistic rounds to, in its columns' order.
ROUNDED_BITS = (8, 4)
_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")
_BIASES = tuple(f"{name}_bias" for name in _WEIGHTS)


class _Widened:
    """An expert-indexed tensor whose slices come out in float32, one expert at a time."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __getitem__(self, expert: int) -> torch.Tensor:
        return self.tensor[expert].float()


class _Seen:
    """An experts module whose weight tensors are replaced by `tensors` (anything `expert_forward` indexes by expert)."""

    def __init__(self, experts: nn.Module, tensors: dict[str, object]):
        self.__dict__.update(experts=experts, tensors=tensors)

    def __getattr__(self, name: str):
        tensors = self.__dict__["tensors"]
        return tensors[name] if name in tensors else getattr(self.__dict__["experts"], name)


def _present(experts: nn.Module, names: tuple[str, ...]) -> list[str]:
    return [name for name in names if isinstance(getattr(experts, name, None), torch.Tensor)]


def round_to_nearest(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """A [out, in] Linear weight as `slimming.quantize` (method rtn, symmetric) stores it, dequantised to its dtype."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    from ..packing import quant_scheme, rtn_parameters  # the quantizer's own scheme and scales: what it writes, not a copy

    scheme = quant_scheme(bits, group, True)
    scale, zero_point = rtn_parameters(weight, scheme)
    return fake_quantize(weight.float(), scale.to(weight.dtype).float(), zero_point, scheme.weights).to(weight.dtype)


def rounded_experts(experts: nn.Module, bits: int, group: int) -> dict[str, torch.Tensor]:
    """Every routed expert's weights rounded: [E, ...] tensors by attribute name, each expert's slice
    rounded as the Linear weight it is stored as (transposed families store the transpose)."""
    transposed = getattr(experts, "is_transposed", False)
    rounded = {}
    for name in _present(experts, _WEIGHTS):
        tensor = getattr(experts, name).detach()
        slices = [round_to_nearest(w.T if transposed else w, bits, group) for w in tensor]
        rounded[name] = torch.stack([w.T if transposed else w for w in slices])
    return rounded



@torch.no_grad()
def round_experts_in_place(experts: nn.Module, bits: int, group: int) -> None:
    """`rounded_experts` written over the experts' own tensors, one expert at a time: no second copy of a layer's
    experts (a streamed fit rounds a 1 GB layer in a memory a few layers large)."""
    transposed = getattr(experts, "is_transposed", False)
    for name in _present(experts, _WEIGHTS):
        for w in getattr(experts, name).detach():
            w.copy_(round_to_nearest(w.T, bits, group).T if transposed else round_to_nearest(w, bits, group))

class _LayerRounding:
    """The current layer's rounded experts, computed on its first batch and replaced when another layer's arrive."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.views: list[_Seen] = []

    def views_of(self, experts: nn.Module, group: int) -> list[_Seen]:
        first = getattr(experts, _present(experts, _WEIGHTS)[0])
        key = (id(experts), first.data_ptr(), group)
        if key != self.key:
            self.key, self.views = None, []  # free the previous layer's copies before making this one's
            biases = {name: _Widened(getattr(experts, name).detach()) for name in _present(experts, _BIASES)}
            for bits in ROUNDED_BITS:
                rounded = rounded_experts(experts, bits, group)
                self.views.append(_Seen(experts, {**{n: _Widened(t) for n, t in rounded.items()}, **biases}))
            self.key = key
        return self.views


_CURRENT = _LayerRounding()


def rtn_output_error(group: int) -> Callable[[RoutedBatch], torch.Tensor]:
    """The update of the `rtn_output_error@<group>` statistic: [E, len(ROUNDED_BITS)] running sums (see the module docstring)."""

    def update(batch: RoutedBatch) -> torch.Tensor:
        experts = batch.experts
        total = torch.zeros(batch.num_experts, len(ROUNDED_BITS), dtype=torch.float64)
        if not batch.counts.any():
            return total
        rounded = _CURRENT.views_of(experts, group)
        widened = _Seen(experts, {name: _Widened(getattr(experts, name).detach()) for name in _present(experts, _WEIGHTS + _BIASES)})
        gates = batch.top_w.double()[batch.pair_token, batch.pair_slot]
        start = 0
        with torch.no_grad():
            for e, count in enumerate(batch.counts.tolist()):
                if count:
                    rows = slice(start, start + count)
                    x = batch.x[batch.pair_token[rows]].float()
                    reference = expert_forward(widened, e, x)
                    weight = gates[rows] ** 2
                    for column, view in enumerate(rounded):
                        error = (expert_forward(view, e, x) - reference).double().pow(2).sum(-1)
                        total[e, column] = (weight * error.to(weight.device)).sum().cpu()
                start += count
        return total

    return update
