"""One MoE forward as the statistics see it: tokens, routing, and expert outputs grouped by expert.

Determinism: a plan must not depend on the thread count or the number of ranks that
calibrated, so every per-token quantity that decides one (output norms, router probabilities,
output moments) is formed in float64 from the values the layer produced, and reduced in a
fixed order: a batch's pairs in their stable sort by expert, batches in calibration order,
ranks in rank order (`distributed.combine`). A float32 sum over thousands of tokens is
rounded differently for each order the tokens arrive in (a relative 1e-7, enough to swap
experts whose scores are that close); in float64 the order costs about 1e-16. What no
accumulator can undo is a forward whose kernels sum in a thread-dependent order: see
`moe_compress/__init__.py` for the one such kernel found on CPU (MKL's float32 GEMM).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from ..arch.adapter import MoEAdapter
from ..arch.expert_math import expert_forward

#: Rows of expert outputs converted to float64 at a time for their norms (bounds the copy).
_NORM_ROWS = 256


@dataclass
class RoutedBatch:
    """One MoE forward: the tokens, the router's logits, the routing it chose, and the expert outputs.

    Expert outputs are held per (token, slot) pair, sorted by expert -- the layout a grouped
    expert kernel computes them in -- so statistics reduce them with one segment sum instead
    of a Python loop over experts. The observer passes the outputs its own forward computed
    (`pair_outputs`); otherwise they are computed here, once, on first use.
    """

    x: torch.Tensor  # [N, H] tokens entering the experts
    logits: torch.Tensor  # [N, E] router logits
    top_idx: torch.Tensor  # [N, k] selected experts
    top_w: torch.Tensor  # [N, k] gate weights actually applied
    adapter: MoEAdapter
    experts: nn.Module
    pair_outputs: torch.Tensor | None = field(default=None, repr=False)  # [N*k, H] f_e(x_t), in `order`
    sequence_length: int | None = None  # tokens per calibration sequence (rows of x are sequence-major)

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]

    @cached_property
    def order(self) -> torch.Tensor:
        """Permutation of the flattened (token, slot) pairs that sorts them by expert (stable)."""
        return torch.sort(self.top_idx.reshape(-1), stable=True).indices

    @cached_property
    def pair_expert(self) -> torch.Tensor:
        return self.top_idx.reshape(-1)[self.order].long()

    @cached_property
    def pair_token(self) -> torch.Tensor:
        return self.order // self.top_idx.shape[-1]

    @cached_property
    def pair_slot(self) -> torch.Tensor:
        return self.order % self.top_idx.shape[-1]

    @cached_property
    def counts(self) -> torch.Tensor:
        """|T_e| in this batch, [E]."""
        return torch.bincount(self.pair_expert, minlength=self.num_experts)

    @cached_property
    def layer_outputs(self) -> torch.Tensor:
        """f_e(x_t) for every routed pair, [N*k, H] in `order`, in the layer's dtype."""
        if self.pair_outputs is None:
            parts, start = [], 0
            for e, count in enumerate(self.counts.tolist()):
                if count:
                    parts.append(expert_forward(self.experts, e, self.x[self.pair_token[start : start + count]]))
                start += count
            self.pair_outputs = torch.cat(parts) if parts else self.x.new_zeros(0, self.x.shape[-1])
        return self.pair_outputs

    @cached_property
    def outputs(self) -> torch.Tensor:
        """`layer_outputs` in float32 or wider."""
        return self.layer_outputs if self.layer_outputs.dtype == torch.float64 else self.layer_outputs.float()

    @cached_property
    def output_norms(self) -> torch.Tensor:
        """||f_e(x_t)|| per routed pair, computed in float64 (a float32 norm rounds near-ties together).

        A few rows at a time are widened, straight from the layer's dtype: no copy of every output.
        """
        return torch.cat([rows.double().norm(dim=-1) for rows in self.layer_outputs.split(_NORM_ROWS)])

    def per_expert(self, values: torch.Tensor) -> torch.Tensor:
        """Sum of per-pair `values` ([N*k] or [N*k, D]) over each expert's pairs -> [E] or [E, D], float64 on CPU."""
        total = values.new_zeros((self.num_experts, *values.shape[1:]), dtype=torch.float64)
        return total.index_add_(0, self.pair_expert, values.double()).cpu()

    @cached_property
    def probs(self) -> torch.Tensor:
        """Full router distribution p_t before top-k, [N, E]."""
        return self.adapter.router_probs(self.logits, torch.float64)

    @cached_property
    def distribution(self) -> torch.Tensor:
        """p_t as a distribution over experts: softmax as it is, sigmoid scores divided by their sum."""
        if self.adapter.router_score == "softmax":
            return self.probs
        return self.probs / self.probs.sum(dim=-1, keepdim=True).clamp_min(1e-30)

    @cached_property
    def renormalised_w(self) -> torch.Tensor:
        """Gate weights renormalised over the selected top-k (REAP's g), [N, k]."""
        w = self.top_w.double()
        return w / w.sum(dim=-1, keepdim=True).clamp_min(1e-20)

    @cached_property
    def dense_gates(self) -> torch.Tensor:
        """g_{t,e}: the applied gate weight, 0 where e was not selected, [N, E]."""
        gates = torch.zeros(self.x.shape[0], self.num_experts, dtype=torch.float64, device=self.top_w.device)
        return gates.scatter_add_(1, self.top_idx.long(), self.top_w.double())

    def routed(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """For each expert with routed tokens: (e, token rows, top-k slot, f_e(x) on those rows, float64)."""
        start = 0
        for e, count in enumerate(self.counts.tolist()):
            if count:
                end = start + count
                yield e, self.pair_token[start:end], self.pair_slot[start:end], self.outputs[start:end].double()
            start += count
