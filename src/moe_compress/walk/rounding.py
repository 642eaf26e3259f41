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

Memory: one layer's rounded experts are kept while that layer is calibrated (a layer sees
several batches; rounding it again for each would cost more than the forward), as int8 codes and
their scales -- compressed-tensors' own `quantize`, widened by its `dequantize` one expert at a time,
the values `round_to_nearest` gives -- so both bit widths together take what the experts take in
bf16, not twice that. Each weight's scales are one block, filled expert by expert: kept as a small block per
expert, allocated between that expert's float32 temporaries (served from the heap inside the walk's
`activation_heap`), they split the blocks freed for the next expert, which then took new memory --
the streamed fit of bench/results/fit_scale.md peaked at 3.9-4.7 GiB per layer of calibration (3.4-3.7 since)
and was killed by its 4.77 GiB cgroup in 5 of 8 cold runs. They are dropped as soon as the layer's weights are: a streamed walk releases
each layer before it reads the next, and the last layer's codes must not outlive the walk (a
streamed fit measures its candidates after it, in the same memory).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection

import torch
from torch import nn

from ..arch.expert_math import expert_forward
from ..source.allocator import trim_heap
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


class _Codes:
    """An expert-indexed weight tensor rounded as `round_to_nearest` rounds each expert's slice, kept as
    int8 codes and scales; indexing gives one expert's rounded slice in float32 (as `_Widened` widens)."""

    def __init__(self, tensor: torch.Tensor, bits: int, group: int, transposed: bool):
        from compressed_tensors.quantization.lifecycle.forward import quantize

        from ..packing import quant_scheme, rtn_parameters

        scheme = quant_scheme(bits, group, True)
        self.args, self.dtype, self.transposed = scheme.weights, tensor.dtype, transposed
        first = tensor[0].T if transposed else tensor[0]
        self.codes = torch.empty((tensor.shape[0], *first.shape), dtype=torch.int8, device=tensor.device)
        self.scales: torch.Tensor | None = None  # [E, *one expert's scale], float32
        self.zero_points: torch.Tensor | None = None
        for e, weight in enumerate(tensor):
            weight = weight.T if transposed else weight
            scale, zero_point = rtn_parameters(weight, scheme)
            scale = scale.to(weight.dtype).float()  # the scale as stored, in the weights' dtype (`round_to_nearest`)
            self.codes[e] = quantize(weight.float(), scale, zero_point, self.args, dtype=torch.int8)
            if self.scales is None:
                self.scales = scale.new_empty((len(tensor), *scale.shape))
                self.zero_points = zero_point.new_empty((len(tensor), *zero_point.shape))
            self.scales[e], self.zero_points[e] = scale, zero_point

    def __getitem__(self, expert: int) -> torch.Tensor:
        from compressed_tensors.quantization.lifecycle.forward import dequantize

        scale, zero_point = self.scales[expert], self.zero_points[expert]
        value = dequantize(self.codes[expert], scale, zero_point, self.args, dtype=torch.float32).to(self.dtype)
        return (value.T.contiguous() if self.transposed else value).float()


def _rounded_codes(experts: nn.Module, bits: int, group: int) -> dict[str, _Codes]:
    """Every routed expert's weights rounded, by attribute name (transposed families store the transpose)."""
    transposed = getattr(experts, "is_transposed", False)
    return {name: _Codes(getattr(experts, name).detach(), bits, group, transposed) for name in _present(experts, _WEIGHTS)}


@torch.no_grad()
def round_experts_in_place(experts: nn.Module, bits: int, group: int, which: Collection[int] | None = None) -> None:
    """Every routed expert's weights (those numbered in `which`, when given) rounded by `round_to_nearest`, written over the
    experts' own tensors, one expert at a time: no second copy of a layer's experts (a streamed fit rounds a 1 GB layer in a
    memory a few layers large)."""
    transposed = getattr(experts, "is_transposed", False)
    for name in _present(experts, _WEIGHTS):
        for expert, w in enumerate(getattr(experts, name).detach()):
            if which is None or expert in which:
                w.copy_(round_to_nearest(w.T, bits, group).T if transposed else round_to_nearest(w, bits, group))

class _LayerRounding:
    """The current layer's rounded experts, computed on its first batch and dropped with its weights
    (or when another layer's arrive, where weights stay in memory)."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.views: list[_Seen] = []

    def views_of(self, experts: nn.Module, group: int) -> list[_Seen]:
        first = getattr(experts, _present(experts, _WEIGHTS)[0])
        key = (id(experts), first.data_ptr(), group)
        if key != self.key:
            self.forget()  # free the previous layer's codes before making this one's
            biases = {name: _Widened(getattr(experts, name).detach()) for name in _present(experts, _BIASES)}
            self.views = [_Seen(experts, {**_rounded_codes(experts, bits, group), **biases}) for bits in ROUNDED_BITS]
            self.key = key
            weakref.finalize(first, self.forget, key)  # the weights released (a streamed walk's next layer, or its end): the codes go too
        return self.views

    def forget(self, key: tuple | None = None) -> None:
        """Drop the kept codes (only if they are still `key`'s, when given)."""
        if key is None or key == self.key:
            self.key, self.views = None, []
            trim_heap()  # the codes' scales were served from the heap


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
