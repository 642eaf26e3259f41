"""What each per-layer choice (keep k experts, at b bits) costs in quality, from statistics collected once.

The proxy of a choice is the squared output error it adds to its MoE layer, as a share of the
layer's gated output energy, both summed over the calibration tokens:

    cost_l(k, b) = ( sum_{e removed} E_e  +  sum_{e kept} R_e(b) ) / sum_e E_e

    E_e    = sum_{t in T_e} (w_{t,e} ||f_e(x_t)||)^2            statistic `gated_output_energy`
    R_e(b) = sum_{t in T_e} w_{t,e}^2 ||f_e^{Q_b}(x_t) - f_e(x_t)||^2   statistic `rtn_output_error@<group>`
    (R_e(16) = 0: as stored; with widths per expert, each kept expert's R_e at its own width)

w_{t,e} is the gate the model applies. Removing e takes w f_e(x) out of every token routed to it
(the rerouting that follows is ignored: the first-order loss), rounding e's weights adds
w (f_e^Q - f_e); both are in the layer's output space, so they add. Which experts are removed
is the method's choice, not the proxy's: for each count k, the plan the method itself makes with
`budget="explicit", keep={every layer: k}` from the same statistics (`planned_kept`) -- the plan
`Prune(method, budget="explicit")` makes, super-expert guard included -- so the proxy prices the
experts that pruning, substituting or merging will actually take away. What taking e away costs
depends on what the method puts in its place:

* pruning (the criteria, REAP, C-Prune): nothing, E_e as above;
* substituting (MoNE, `Method.substitutes`): its novice, the constant n_e = mean_{t in T_e} f_e(x_t), scaled by
  the same gate (every router row stays, so nothing reroutes): the residual
      N_e = sum_{t in T_e} w^2 ||f_e(x_t) - n_e||^2 = E_e - 2 n_e . S_e + ||n_e||^2 W_e
  with W_e = sum w^2 and S_e = sum w^2 f_e(x_t) (statistic `gated_output_sums`), n_e from `output_moments`;
* merging (HC-SMoE, M-SMoE, REAM): each expert merged away priced as removed, E_e -- pessimistic where
  the merged expert still does part of its members' work, and blind to what averaging changes in the
  representative itself; the candidates are measured end to end, so a mispriced merge costs a candidate,
  not the result.

Dropping the whole decoder block l (attention, norms, shared experts and routed experts: `Drop(unit="block")`)
removes exactly its residual update: the block computes h_out = h_in + delta_l(h_in), and without it
the next block reads h_in. So, to first order (what the next blocks make of the changed input ignored,
as the rerouting is above), its squared output error is

    B_l = sum_t ||h_out,t - h_in,t||^2                               statistic `block_residual_energy`

summed over the same calibration tokens, on the same scale as every other choice of layer l:

    cost_l(block dropped) = B_l / sum_e E_e

Dropping the MoE sub-layer alone costs 1 = sum_e E_e / sum_e E_e on that scale (every expert's
gated output removed); the block's update holds the MoE's output and attention's besides, so B_l is
typically several times the MoE's energy, and the block is dropped only where the bytes it frees
(its experts and every other weight it holds, `fitting.search`) are worth that.

Why a sum over layers is the model's cost. Each layer's cost is a noise-to-signal ratio: error
energy over the energy the layer writes into the residual stream. Small, independent perturbations
of different layers' outputs move the final distribution by amounts whose second-order effect
(the KL, to first non-vanishing order a quadratic form in the perturbations) has no cross terms
in expectation when the perturbations are uncorrelated -- rounding noise is, and removed experts
of different layers are different functions -- so the KL is approximately a weighted sum of the
layers' error energies. Normalising each by its layer's energy treats every layer's relative error
alike (deeper layers write larger outputs: their absolute errors would otherwise dominate). That is
the assumption every per-layer allocation (HAWQ, AutoQuantize, Puzzletron's per-layer scores) makes;
`fit` checks it on the candidates it measures (the Spearman correlation in its report).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..arch.adapter import MoEAdapter
from ..methods import PlanRequest
from ..methods.expert_pruning import routing_limits
from ..stages.prune import removed_share
from ..walk.moments import output_moments, split_moments
from ..walk.rounding import ROUNDED_BITS
from .fit_method import FitMethod

ENERGY = "gated_output_energy"
#: The whole decoder layer's residual update, B_l (what dropping its block costs).
BLOCK_ENERGY = "block_residual_energy"
#: What a substituting method's removal costs besides (`novice_residual`).
NOVICE_SUMS = "gated_output_sums"


def rounding_statistic(group: int) -> str:
    return f"rtn_output_error@{group}"


def proxy_statistics(method: FitMethod, group: int) -> tuple[str, ...]:
    """What one calibration pass must collect for the proxies of `method` at the quantizer's `group`: the energies (the
    experts' and the whole block's) and rounding errors, the novices' sums for a substituting method, and every statistic the method's plans read."""
    return tuple(dict.fromkeys((ENERGY, BLOCK_ENERGY, rounding_statistic(group), *((NOVICE_SUMS,) if method.substitutes else ()), *method.needs())))


def planned_kept(method: FitMethod, adapter: MoEAdapter, config, stats: dict[int, dict[str, torch.Tensor]], counts: dict[int, list[int]],
                 min_keep: int = 0) -> dict[int, dict[int, list[int]]]:
    """Per MoE layer, per allowed kept count, the experts the method's own explicit plan keeps (ascending ids): one plan
    per count, every layer at it (or unchanged where it is not allowed), as `Prune(method, budget="explicit")` makes it.
    Neuron alignment (merging's `align`) changes how members are averaged, not who stays, so it is left out here."""
    overrides = {"align": "none"} if "align" in method.chosen.options else {}
    experts = {layer: s[ENERGY].numel() for layer, s in stats.items()}
    kept: dict[int, dict[int, list[int]]] = {layer: {} for layer in counts}
    for k in sorted({k for allowed in counts.values() for k in allowed}):
        keep = {layer: k if k in counts[layer] else experts[layer] for layer in counts}
        plan = method.plan(PlanRequest(adapter, config, stats, removed_share(keep, experts), "explicit", min_keep, keep=keep), **overrides)
        for entry in plan.layers:
            if k in counts[entry.layer]:
                kept[entry.layer][k] = sorted(entry.keep)
    return kept


def novice_residual(layer_stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """[E] N_e of the module docstring: the squared error of replacing each expert by its mean output (MoNE's novice)."""
    energy, sums = layer_stats[ENERGY].double(), layer_stats[NOVICE_SUMS].double()
    _, mean, _ = split_moments(output_moments(layer_stats))
    mean = mean.double()
    return (energy - 2 * (mean * sums[:, 1:]).sum(1) + mean.pow(2).sum(1) * sums[:, 0]).clamp_min(0.0)


@dataclass(frozen=True)
class LayerProxy:
    """One MoE layer's proxy inputs: per expert, its energy and rounding errors; and which experts each count keeps."""

    layer: int
    energy: torch.Tensor  # [E] E_e
    rounding: dict[int, torch.Tensor]  # bits -> [E] R_e(b)
    kept: dict[int, list[int]]  # allowed kept count -> expert ids the method keeps
    removal: torch.Tensor | None = None  # [E] what taking each expert away costs, where not E_e (MoNE's N_e)
    block: float | None = None  # B_l: the whole decoder layer's residual update energy (None: not observed, no block drop priced)

    @property
    def experts(self) -> int:
        return self.energy.numel()

    @property
    def removed_cost(self) -> torch.Tensor:
        return self.energy if self.removal is None else self.removal

    def cost(self, keep: int, bits: int) -> float:
        """cost_l(keep, bits) of the module docstring (0 for the layer unchanged). keep 0 is the routed MoE
        dropped: every expert removed, no rerouting to ignore, so 1 -- the layer's whole routed output lost."""
        total = float(self.energy.sum())
        if total <= 0:
            return 0.0
        if keep == 0:
            return 1.0
        mask = torch.zeros(self.experts, dtype=torch.bool)
        mask[self.kept[keep]] = True
        return (float(self.removed_cost[~mask].sum()) + float(self.rounding[bits][mask].sum())) / total

    def block_cost(self) -> float:
        """cost_l(block dropped) of the module docstring, B_l / sum_e E_e; where no expert output was seen (no energy to
        scale by), 0 for a block that changes nothing and 1 -- as the MoE sub-layer's drop -- for one that does."""
        assert self.block is not None, "the block's residual energy was not observed"
        total = float(self.energy.sum())
        if total <= 0:
            return 0.0 if self.block <= 0 else 1.0
        return self.block / total

    def raised(self, keep: int, bits: int, wider: tuple[int, ...], to: int) -> float:
        """What the kept experts `wider` (by their place among the kept: `gain_order`) at `to` bits instead of `bits` add to
        `cost(keep, bits)`: sum of R_e(to) - R_e(bits) over them, over the layer's energy (<= 0 for a wider `to`)."""
        total = float(self.energy.sum())
        if total <= 0 or not wider:
            return 0.0
        experts = [self.kept[keep][place] for place in wider]
        return float((self.rounding[to][experts] - self.rounding[bits][experts]).sum()) / total

    def gain_order(self, keep: int, bits: int, to: int) -> list[int]:
        """The experts kept at count `keep`, by their place among them (ascending ids: the number the prune stage gives
        them), the largest gain of rounding at `to` bits instead of `bits` first, R_e(bits) - R_e(to) (ties: the lower place)."""
        gains = (self.rounding[bits] - self.rounding[to])[self.kept[keep]].tolist()
        return sorted(range(len(gains)), key=lambda place: (-gains[place], place))


def layer_proxies(
    method: FitMethod, adapter: MoEAdapter, config, stats: dict[int, dict[str, torch.Tensor]], group: int, min_keep: int = 0
) -> dict[int, LayerProxy]:
    """Per MoE layer, its `LayerProxy`: every kept count its router allows (a multiple of the routing
    groups, from max(top_k, min_keep) to E) with the experts the method keeps at that count (`planned_kept`)."""
    limits = routing_limits(adapter, config)
    floor = max(limits.min_units(), -(-min_keep // limits.groups)) * limits.groups
    counts = {layer: list(range(floor, s[ENERGY].numel() + 1, limits.groups)) for layer, s in sorted(stats.items())}
    kept = planned_kept(method, adapter, config, stats, counts, min_keep)
    substitutes = method.substitutes
    proxies = {}
    for layer, s in sorted(stats.items()):
        errors = s[rounding_statistic(group)]
        rounding = {16: torch.zeros(errors.shape[0], dtype=torch.float64)} | {b: errors[:, i].double() for i, b in enumerate(ROUNDED_BITS)}
        proxies[layer] = LayerProxy(layer, s[ENERGY].double(), rounding, kept[layer], novice_residual(s) if substitutes else None,
                                    float(s[BLOCK_ENERGY].sum()) if BLOCK_ENERGY in s else None)
    return proxies


def other_weights(model, adapter: MoEAdapter) -> list[str]:
    """The 2-D decoder weights besides the routed experts and routers (attention, shared experts, dense MLPs), in order."""
    from ..slimming.quantize import parameter_roles

    parameters = dict(model.named_parameters())
    return [name for name, role in parameter_roles(model, adapter).items()
            if role in ("attention", "shared", "dense") and name in parameters and parameters[name].dim() == 2]


@torch.no_grad()
def rounding_costs(weight: torch.Tensor, group: int) -> dict[int, float]:
    """||Q_b(W) - W||^2 / ||W||^2 of one weight at each rounded width (see `other_costs`)."""
    from ..walk.rounding import round_to_nearest

    w = weight.double()
    return {bits: float((round_to_nearest(weight, bits, group).double() - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-300)) for bits in ROUNDED_BITS}


def summed_costs(per_weight: list[dict[int, float]]) -> dict[int, float]:
    """`other_costs` from each weight's `rounding_costs`, summed in the order given."""
    return {16: 0.0} | {bits: sum(costs[bits] for costs in per_weight) for bits in ROUNDED_BITS}


def other_costs(model, adapter: MoEAdapter, group: int) -> dict[int, float]:
    """What rounding the decoder weights besides the routed experts (quantize's scope "all": attention,
    shared experts, dense MLPs) costs at each width: per 2-D weight W, ||Q_b(W) - W||^2 / ||W||^2, summed.

    That is the relative output error W adds for inputs of equal energy in every direction -- a
    weight-space estimate, unlike the experts' costs measured on routed calibration tokens: real
    inputs concentrate in few directions, so it tends to overstate the error, and fit lowers these
    weights only where that buys more than it costs by this measure (the measured KL has the last word).
    """
    parameters = dict(model.named_parameters())
    return summed_costs([rounding_costs(parameters[name], group) for name in other_weights(model, adapter)])
