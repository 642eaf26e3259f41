"""Per-expert statistics gathered by accumulators, never by buffering every token.

Each statistic is a running sum over calibration tokens, kept in float64 so that long
calibration runs do not lose precision. A method asks for statistics by name; the observer
computes only those, and the expensive per-expert outputs f_e(x) only when a requested
statistic needs them (and then only on the tokens routed to each expert).

Each batch is seen through `routed_batch.RoutedBatch`; see its note on determinism.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..arch.expert_math import expert_forward
from .moments import batch_moments, merge_moments
from .routed_batch import RoutedBatch


def _add(total: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    return total + part


@dataclass(frozen=True)
class Statistic:
    """A named accumulator: `update(batch)` returns this batch's part, `merge` folds it in.

    Most statistics are running sums of shape [E] (merge = add); moments use Chan's parallel
    update so that variances stay accurate however many batches are merged.
    """

    name: str
    update: Callable[..., torch.Tensor]  # RoutedBatch -> part; BlockPass -> part where `sees_block`
    needs_expert_outputs: bool = False
    doc: str = ""
    merge: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _add
    per_batch: bool = False  # one row per calibration batch, stacked in batch order (not folded)
    # `update` reads a `BlockPass` (the whole decoder layer's input and output), not the MoE's routed batch: one value per layer
    sees_block: bool = False


@dataclass(frozen=True)
class BlockPass:
    """One calibration batch through a whole decoder layer: the hidden states it took and those it gave."""

    before: torch.Tensor
    after: torch.Tensor


def _block_residual_energy(block: BlockPass) -> torch.Tensor:
    """[1]: sum over the batch's tokens of ||h_out - h_in||^2, what the decoder layer adds to the residual stream
    (dropping the block removes exactly that)."""
    return (block.after.double() - block.before.double()).pow(2).sum().reshape(1).cpu()


def _max_output_abs(batch: RoutedBatch) -> torch.Tensor:
    """Per expert, the largest |f_e(x_t)| over its routed tokens and output channels (0 if none).

    max |x| is taken as max(max x, -min x), in the outputs' own dtype: exact (negation and the maximum of two
    floats round nothing, and widening after the maximum gives what widening first gives), and on a [16384, 2048]
    bf16 batch 16 ms against 161 for widening to float32, then |x|, then the maximum."""
    outputs = batch.layer_outputs
    if outputs.numel():
        peaks = torch.maximum(outputs.amax(dim=-1), outputs.amin(dim=-1).neg()).abs().double()  # abs: -0.0 -> 0.0
    else:
        peaks = outputs.new_zeros(0, dtype=torch.float64)
    total = peaks.new_zeros(batch.num_experts)
    return total.scatter_reduce_(0, batch.pair_expert, peaks, reduce="amax").cpu()


def _gated_output_sums(batch: RoutedBatch) -> torch.Tensor:
    """[E, 1 + H]: per expert, sum over T_e of w_{t,e}^2 and of w_{t,e}^2 f_e(x_t) (w the gate applied), one expert's
    rows widened at a time (as `moments.batch_moments`). With `gated_output_energy` and the mean output they give
    sum_t w^2 ||f_e(x_t) - c||^2 for any constant c: what replacing e by c (MoNE's novice) adds to the layer's squared error."""
    counts = batch.counts.tolist()
    squares = batch.top_w.double()[batch.pair_token, batch.pair_slot] ** 2
    rows = [torch.cat([weights.sum().reshape(1), (weights[:, None] * part.double()).sum(0)])
            for weights, part in zip(torch.split(squares, counts), torch.split(batch.layer_outputs, counts))]
    return torch.stack(rows).cpu()


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
            lambda b: batch_moments(b)[None],
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
            "gated_output_energy",
            lambda b: b.per_expert((b.top_w.double()[b.pair_token, b.pair_slot] * b.output_norms) ** 2),
            needs_expert_outputs=True,
            doc="sum over T_e of (w_{t,e} ||f_e(x_t)||)^2, w the gate applied (what removing e takes from the layer's squared output)",
        ),
        Statistic(
            "gated_output_sums",
            _gated_output_sums,
            needs_expert_outputs=True,
            doc="per expert: sum over T_e of w_{t,e}^2, and of w_{t,e}^2 f_e(x_t) [E, 1 + H] (w the gate applied)",
        ),
        Statistic(
            "block_residual_energy",
            _block_residual_energy,
            doc="[1]: sum over all tokens of ||h_out - h_in||^2, the whole decoder layer's residual update (what dropping the block removes)",
            sees_block=True,
        ),
        Statistic(
            "output_moments",
            batch_moments,
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
    if family == "rtn_output_error" and parameter.isdigit():
        from .rounding import ROUNDED_BITS, rtn_output_error

        bits = " and ".join(map(str, ROUNDED_BITS))
        return Statistic(name, rtn_output_error(int(parameter)), doc=f"sum over T_e of w^2 ||f_e^RTN(x) - f_e(x)||^2 at {bits} bits, groups of {parameter}")
    raise KeyError(
        f"unknown statistic {name!r}; known: {sorted(STATISTICS)}, signature_similarity@<probe tokens>, input_sample@<tokens> "
        "and rtn_output_error@<group size>"
    )


class LayerAccumulator:
    """Running sums (or other merges) of the requested statistics for one MoE layer."""

    def __init__(self, names: tuple[str, ...]):
        self.statistics = [get_statistic(name) for name in names]
        self.sums: dict[str, torch.Tensor] = {}

    @property
    def needs_expert_outputs(self) -> bool:
        return any(s.needs_expert_outputs for s in self.statistics)

    @property
    def sees_block(self) -> bool:
        """Whether a statistic reads the whole decoder layer's input and output (`update_block`)."""
        return any(s.sees_block for s in self.statistics)

    def combine_ranks(self) -> None:
        """Fold in the other ranks' parts of every statistic (exact merges; see `distributed.combine`)."""
        from ..distributed import combine

        for statistic in self.statistics:
            self.sums[statistic.name] = combine(self.sums[statistic.name], statistic.merge, statistic.per_batch)

    def update(self, batch: RoutedBatch) -> None:
        self._fold([s for s in self.statistics if not s.sees_block], batch)

    def update_block(self, block: BlockPass) -> None:
        self._fold([s for s in self.statistics if s.sees_block], block)

    def _fold(self, statistics: list[Statistic], seen: RoutedBatch | BlockPass) -> None:
        for statistic in statistics:
            part = statistic.update(seen)
            name = statistic.name
            self.sums[name] = part if name not in self.sums else statistic.merge(self.sums[name], part)


def unreached_experts(stats: dict[int, dict[str, torch.Tensor]]) -> list[tuple[int, int]]:
    """(decoder layer, expert) pairs calibration routed no token to, from observed "selected" counts."""
    missing = [layer for layer, values in stats.items() if "selected" not in values]
    if missing:
        raise ValueError(f"statistics of layer {missing[0]} have no 'selected' counts; observe them with the stage's statistics.")
    return [(layer, int(e)) for layer in sorted(stats) for e in torch.nonzero(stats[layer]["selected"] == 0).flatten().tolist()]
