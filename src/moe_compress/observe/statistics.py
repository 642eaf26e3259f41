"""Per-expert statistics gathered by accumulators, never by buffering every token.

Each statistic is a running sum over calibration tokens, kept in float64 so that long
calibration runs do not lose precision. A method asks for statistics by name; the observer
computes only those, and the expensive per-expert outputs f_e(x) only when a requested
statistic needs them (and then only on the tokens routed to each expert).

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

from collections.abc import Callable, Iterator
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


def _add(total: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    return total + part


@dataclass(frozen=True)
class Statistic:
    """A named accumulator: `update(batch)` returns this batch's part, `merge` folds it in.

    Most statistics are running sums of shape [E] (merge = add); moments use Chan's parallel
    update so that variances stay accurate however many batches are merged.
    """

    name: str
    update: Callable[[RoutedBatch], torch.Tensor]
    needs_expert_outputs: bool = False
    doc: str = ""
    merge: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _add
    per_batch: bool = False  # one row per calibration batch, stacked in batch order (not folded)


def _per_expert(batch: RoutedBatch, value: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """[E] from a function of one expert's routed pairs (for statistics that need a loop)."""
    total = torch.zeros(batch.num_experts, dtype=torch.float64)
    for e, rows, slot, out in batch.routed():
        total[e] = value(e, rows, slot, out)
    return total


def _max_output_abs(batch: RoutedBatch) -> torch.Tensor:
    """Per expert, the largest |f_e(x_t)| over its routed tokens and output channels (0 if none)."""
    peaks = batch.outputs.abs().amax(dim=-1).double() if batch.outputs.numel() else batch.outputs.new_zeros(0, dtype=torch.float64)
    total = peaks.new_zeros(batch.num_experts)
    return total.scatter_reduce_(0, batch.pair_expert, peaks, reduce="amax").cpu()


def _dense_output_sum(batch: RoutedBatch, gated: bool) -> torch.Tensor:
    """[E, H]: sum over *all* tokens of f_e(x_t), or of p_{t,e} f_e(x_t) when `gated`.

    Every expert runs on every token (routed or not), one expert at a time, so the working
    memory is one [N, H] output, never [E, N, H].
    """
    total = torch.zeros(batch.num_experts, batch.x.shape[-1], dtype=torch.float64)
    for e in range(batch.num_experts):
        out = expert_forward(batch.experts, e, batch.x).double()
        total[e] = ((batch.probs[:, e : e + 1] * out).sum(0) if gated else out.sum(0)).cpu()
    return total


def _batch_moments(batch: RoutedBatch) -> torch.Tensor:
    """[E, 1 + 2H]: per expert, count of routed tokens, mean output, sum of squared deviations.

    Two passes (mean, then squared deviations from it), so there is no cancellation, in float64
    (see the module's note on determinism); batches are then merged in float64 (Chan). Each
    expert's pairs are contiguous, so one expert's rows at a time are widened from the layer's
    dtype: no copy of every output, and faster on CPU than a float32 `index_add_` over all pairs.
    """
    rows = []
    for part in torch.split(batch.layer_outputs, batch.counts.tolist()):
        total = part.sum(0, dtype=torch.float64)
        mean = total / max(part.shape[0], 1)
        deviation = part.double() - mean
        rows.append(torch.cat([total.new_tensor([part.shape[0]]), mean, (deviation * deviation).sum(0)]))
    return torch.stack(rows).cpu()


def merge_moments(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Chan et al.'s pairwise combination of (count, mean, M2) per expert."""
    hidden = (a.shape[1] - 1) // 2
    n_a, n_b = a[:, :1], b[:, :1]
    n = n_a + n_b
    safe_n = n.clamp_min(1)
    delta = b[:, 1 : 1 + hidden] - a[:, 1 : 1 + hidden]
    mean = a[:, 1 : 1 + hidden] + delta * n_b / safe_n
    m2 = a[:, 1 + hidden :] + b[:, 1 + hidden :] + delta**2 * n_a * n_b / safe_n
    return torch.cat([n, mean, m2], dim=1)


def split_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count [E], mean [E, H], population variance [E, H]) from accumulated moments."""
    hidden = (moments.shape[1] - 1) // 2
    count = moments[:, 0]
    variance = moments[:, 1 + hidden :] / count.clamp_min(1).unsqueeze(1)
    return count, moments[:, 1 : 1 + hidden], variance


def output_moments(layer_stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """A layer's whole-calibration output moments, from `output_moments` or merged from its per-batch ones.

    MoNE's running variance collects only the per-batch statistic; its novice vectors (and the
    super-expert repair of a MoNE plan) still need the means over the whole calibration.
    """
    if "output_moments" in layer_stats:
        return layer_stats["output_moments"]
    per_batch = layer_stats["output_moments_per_batch"]
    merged = per_batch[0]
    for moments in per_batch[1:]:
        merged = merge_moments(merged, moments)
    return merged


STATISTICS: dict[str, Statistic] = {
    s.name: s
    for s in (
        Statistic("tokens", lambda b: torch.full((b.num_experts,), float(b.x.shape[0]), dtype=torch.float64), doc="T, tokens seen"),
        Statistic("selected", lambda b: b.counts.double().cpu(), doc="|T_e|, tokens routed to e"),
        Statistic("prob_sum", lambda b: b.probs.sum(0).cpu(), doc="sum_t p_{t,e}"),
        Statistic(
            "router_dist_sum",
            lambda b: b.distribution.sum(0).cpu(),
            doc="sum_t p_{t,e} / sum_e' p_{t,e'} (equals prob_sum for softmax routers)",
        ),
        Statistic("gate_sum", lambda b: b.dense_gates.sum(0).cpu(), doc="sum_t g_{t,e}"),
        Statistic(
            "output_norm_sum",
            lambda b: b.per_expert(b.output_norms),
            needs_expert_outputs=True,
            doc="sum over T_e of ||f_e(x_t)||",
        ),
        Statistic(
            "reap_sum",
            lambda b: b.per_expert(b.renormalised_w[b.pair_token, b.pair_slot] * b.output_norms),
            needs_expert_outputs=True,
            doc="sum over T_e of g~_{t,e} ||f_e(x_t)|| (g renormalised over the top-k)",
        ),
        Statistic(
            "output_moments_per_batch",
            lambda b: _batch_moments(b)[None],
            needs_expert_outputs=True,
            doc="output_moments of each calibration batch on its own, stacked in batch order [batches, E, 1 + 2H]",
            merge=lambda total, part: torch.cat([total, part]),
            per_batch=True,
        ),
        Statistic(
            "reap_prob_sum",
            lambda b: b.per_expert(b.probs[b.pair_token, b.pair_expert] * b.output_norms),
            needs_expert_outputs=True,
            doc="sum over T_e of p_{t,e} ||f_e(x_t)|| (router probability, not renormalised)",
        ),
        Statistic(
            "pooled_expert_outputs",
            lambda b: pooled_expert_outputs(b),
            doc="per calibration sequence, every expert's output on the sequence-mean MoE input [sequences, E, H] (float16)",
            merge=lambda total, part: torch.cat([total, part]),
        ),
        Statistic(
            "max_output_abs",
            _max_output_abs,
            needs_expert_outputs=True,
            doc="max over T_e and output channels of |f_e(x_t)| (super-expert detection)",
            merge=torch.maximum,
        ),
        Statistic(
            "logit_gram",
            lambda b: (b.logits.double().T @ b.logits.double()).cpu(),
            doc="sum_t z_t z_t^T [E, E]: router-logit columns' inner products (cosine similarity of experts' logits)",
        ),
        Statistic(
            "output_sum_all",
            lambda b: _dense_output_sum(b, gated=False),
            doc="sum over all tokens of f_e(x_t) [E, H] (every expert runs on every token)",
        ),
        Statistic(
            "gated_output_sum_all",
            lambda b: _dense_output_sum(b, gated=True),
            doc="sum over all tokens of p_{t,e} f_e(x_t) [E, H] (router-probability-weighted, every expert on every token)",
        ),
        Statistic(
            "output_moments",
            _batch_moments,
            needs_expert_outputs=True,
            doc="per expert: |T_e|, mean and M2 of f_e(x_t) over T_e (per dimension)",
            merge=merge_moments,
        ),
    )
}


def pooled_expert_outputs(batch: RoutedBatch) -> torch.Tensor:
    """C-Prune's expert signatures for one batch: [sequences, E, H].

    The authors' code (`PreTrainedMoEPruner.forward` / `generate_and_save_expert_output`) mean-pools
    each sequence's MoE input over its tokens, runs every expert on that one vector, and clusters
    the outputs after casting them to float16; the float16 rounding is kept here so that near-equal
    distances break the same way. Sequences concatenate in calibration order (merged across ranks
    in rank order, which regroups C-Prune's clustering batches in a distributed run).
    """
    if batch.sequence_length is None:
        raise ValueError("pooled_expert_outputs needs the calibration batches' sequence length")
    pooled = batch.x.float().view(-1, batch.sequence_length, batch.x.shape[-1]).mean(dim=1).to(batch.x.dtype)
    outputs = [expert_forward(batch.experts, e, pooled) for e in range(batch.num_experts)]
    return torch.stack(outputs, dim=1).to(torch.float16).cpu()


def signature_similarity(probe_tokens: int) -> Statistic:
    """Per batch, the cosine similarity [1, E, E] of all experts' outputs on one shared probe.

    Every expert (routed or not) runs on the batch's first `probe_tokens` tokens; its
    signature is its flattened output there. Batches are stacked, not summed, so a method
    can cluster each batch separately and vote (C-Prune).
    """

    def update(batch: RoutedBatch) -> torch.Tensor:
        probe = batch.x[:probe_tokens]
        signatures = torch.stack([expert_forward(batch.experts, e, probe).double().reshape(-1) for e in range(batch.num_experts)])
        unit = signatures / signatures.norm(dim=1, keepdim=True).clamp_min(1e-30)
        return (unit @ unit.T)[None].cpu()

    return Statistic(
        f"signature_similarity@{probe_tokens}",
        update,
        doc=f"cosine similarity of expert outputs on a shared probe of {probe_tokens} tokens, per batch",
        merge=lambda total, part: torch.cat([total, part]),
        per_batch=True,
    )


def input_sample(tokens: int) -> Statistic:
    """Per batch, the MoE inputs x of `tokens` evenly spaced tokens [n, H] (float32), concatenated.

    A bounded sample (tokens x batches rows per layer), not a buffer of every token: methods
    that must evaluate chosen experts on real inputs after planning (REAM's neuron alignment)
    read it. Only the set of sampled tokens matters to them, not its order, so ranks of a
    distributed run concatenate their samples in rank order.
    """

    def update(batch: RoutedBatch) -> torch.Tensor:
        rows = torch.linspace(0, batch.x.shape[0] - 1, min(tokens, batch.x.shape[0])).round().long()
        return batch.x[rows.to(batch.x.device)].detach().float().cpu()

    return Statistic(
        f"input_sample@{tokens}",
        update,
        doc=f"MoE inputs of {tokens} evenly spaced tokens of each batch, concatenated",
        merge=lambda total, part: torch.cat([total, part]),
    )


def get_statistic(name: str) -> Statistic:
    """A registered statistic, or a parameterised one such as 'signature_similarity@64'."""
    if name in STATISTICS:
        return STATISTICS[name]
    family, _, parameter = name.partition("@")
    if family == "signature_similarity" and parameter.isdigit() and int(parameter) > 0:
        return signature_similarity(int(parameter))
    if family == "input_sample" and parameter.isdigit() and int(parameter) > 0:
        return input_sample(int(parameter))
    raise KeyError(f"unknown statistic {name!r}; known: {sorted(STATISTICS)}, signature_similarity@<probe tokens> and input_sample@<tokens>")


class LayerAccumulator:
    """Running sums (or other merges) of the requested statistics for one MoE layer."""

    def __init__(self, names: tuple[str, ...]):
        self.statistics = [get_statistic(name) for name in names]
        self.sums: dict[str, torch.Tensor] = {}

    @property
    def needs_expert_outputs(self) -> bool:
        return any(s.needs_expert_outputs for s in self.statistics)

    def combine_ranks(self) -> None:
        """Fold in the other ranks' parts of every statistic (exact merges; see `distributed.combine`)."""
        from ..distributed import combine

        for statistic in self.statistics:
            self.sums[statistic.name] = combine(self.sums[statistic.name], statistic.merge, statistic.per_batch)

    def update(self, batch: RoutedBatch) -> None:
        for statistic in self.statistics:
            part = statistic.update(batch)
            name = statistic.name
            self.sums[name] = part if name not in self.sums else statistic.merge(self.sums[name], part)
