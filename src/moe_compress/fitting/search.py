"""From sizes and proxies to the few allocations worth measuring, each as the stages that make it.

Per MoE layer the options (`fitting.choices`) are every (kept count, bit width) pair: bytes exact from the shard
headers (`stages.sizes.candidate_bytes`), cost from the proxies (`fitting.proxies`); with the proxies,
each such pair with the m kept experts whose rounding error falls most at a wider width b' raised to
it (`expert_choices`: m = 1, 2, 4, ... below the kept count, b' each wider width), so that slack too
small to widen a whole layer widens the experts that gain most from it; dropping its whole decoder
block (`BLOCK_DROPPED`: attention, norms, shared experts and routed experts gone; minus the rest of
the block in bytes, against the fixed part that holds it, at the other weights' width; cost B_l over
the layer's energy, `LayerProxy.block_cost`); and, where its MoE sub-layer holds nothing but routed
experts and router (`droppable`), dropping that sub-layer alone (`DROPPED`: 0 bytes, cost 1 -- every
expert's energy removed; a family with shared experts is not offered it: layer drop removes them too,
which the statistics do not price, but the block drop prices them with the rest of the block). Either
drop only as long as one MoE layer keeps routing (`optimum`), so never every block. Besides, one
global choice: the width of the other decoder weights (attention, shared experts, dense MLPs;
quantize's scope "all"), 16 / 8 / 4 where the sizes know their packed bytes
(`CheckpointSizes.others`), priced by `proxies.other_costs`; it moves the fixed part, and what a
dropped block frees (one table per width). The solver
(`fitting.solver.solve`) picks one option per layer under the weight budget, once per width of the
other weights. What is then measured:

* the solver's optimum over every (experts kept, width) pair per layer -- widths mix across layers,
  written by the quantize stage's per-layer `expert_bits` (`PER_LAYER_BITS`) -- at every width of
  the other weights that reaches the budget: the one of least total proxy named "fit", the others
  "fit, other weights 16-bit" and so on. The other weights' proxy is a weight-space estimate on
  another scale than the experts' costs, so the measurement, not the proxy, picks their width;
* the front points (`fitting.solver.front`) just under the budget around the best of them, in case the
  proxy ranks near neighbours wrongly;
* the single-method configurations at the same budget, which the search must beat to be worth
  anything: the method alone at the smallest layer ratio that fits, and 8-bit / 4-bit alone (the
  routed experts, or where that does not fit, every decoder weight: quantize's scope "all").

Each allocation becomes a list of stages -- `Prune(method, budget="explicit", keep=...)`,
`Drop(unit="block", layers=...)`, `Drop(layers=...)` (the block drop before the MoE drop, whose layers, like the quantize's, it renumbers), then
`Quantize(bits=..., scope="experts" or "all", expert_bits=...)` (final: it writes the checkpoint, so it comes last) -- that
`pipeline.run_stages` runs; their `predict` gives the same bytes as the table (asserted), so what is measured is what fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..stages.base import Stage
from ..stages.drop import Drop
from ..stages.footprint import Footprint
from ..stages.quantize import Quantize
from ..stages.sizes import BITS, CheckpointSizes, candidate_bytes
from .choices import NOT_ROUTING, Choice, costs, layer_choices, rows as table_rows, table
from .fit_method import FitMethod
from .proxies import LayerProxy
from .solver import Allocation, Option, front, smallest_bytes, solve

#: The solver mixes widths across layers in one table (`Quantize(expert_bits={layer: bits})`); False
#: solves once per width, every routed expert of a candidate at one width.
PER_LAYER_BITS = True
#: Front points measured beside each optimum.
FRONT_POINTS = 2


@dataclass
class Candidate:
    """One allocation to measure: its name, what each MoE layer keeps, its predicted bytes and proxy, its stages."""

    name: str
    allocation: dict[int, Choice]
    bytes: int  # predicted saved weight bytes
    proxy: float
    stages: list[Stage]
    measured: dict = field(default_factory=dict)  # kl, top1, perplexity, original_perplexity (after measuring)
    aliases: list[str] = field(default_factory=list)  # other names of the same allocation (a single method the optimum equals)
    other_bits: int = 16  # the decoder weights besides the routed experts (16: as stored)

    @property
    def key(self) -> tuple:
        return self.other_bits, tuple(sorted((i, c.keep, c.bits, c.wider, c.to, c.block) for i, c in self.allocation.items()))

    @property
    def dropped_blocks(self) -> list[int]:
        """The decoder layers whose whole block the allocation drops."""
        return sorted(i for i, c in self.allocation.items() if c.block)

    def to_dict(self) -> dict:
        return {"name": self.name, "aliases": self.aliases, "bytes": self.bytes, "proxy": self.proxy, "stages": [{s.kind: s.given()} for s in self.stages],
                "allocation": {str(i): c.entry() for i, c in self.allocation.items()}, "other_bits": self.other_bits,
                **self.measured}


def _routing(allocation: Allocation) -> bool:
    """Whether an allocation leaves a MoE layer routing (a plan dropping them all is refused)."""
    return any(label not in NOT_ROUTING for label in allocation.labels)


def _undroppable(rows: list[list[Option]], layer: int) -> list[list[Option]]:
    """`rows` with `layer` denied its drops (always its last options), the other layers' option indices unchanged."""
    def kept(row: list[Option]) -> list[Option]:
        routing = len(row)
        while routing > 1 and row[routing - 1].label in NOT_ROUTING:
            routing -= 1
        return row[:routing]

    return [kept(row) if index == layer else row for index, row in enumerate(rows)]


def reachable(rows: list[list[Option]], fixed: int) -> int:
    """The smallest total an allocation that leaves a MoE layer routing reaches: the smallest of all but one layer dropped."""
    return min(smallest_bytes(_undroppable(rows, layer), fixed) for layer in range(len(rows)))


def optimum(rows: list[list[Option]], budget: int, fixed: int) -> Allocation:
    """`solver.solve` with a MoE layer left routing: where the optimum drops every layer, the best of the optima
    with one layer denied its drop (each layer in turn)."""
    found = solve(rows, budget, fixed)
    if _routing(found):
        return found
    tables = [_undroppable(rows, layer) for layer in range(len(rows))]
    return min((solve(t, budget, fixed) for t in tables if smallest_bytes(t, fixed) <= budget), key=lambda a: (a.cost, a.bytes))


def other_widths(sizes: CheckpointSizes) -> tuple[int, ...]:
    """The widths the other decoder weights may take: every width where their packed bytes are known, else as stored."""
    return BITS if sizes.others else (16,)


def fixed_bytes(sizes: CheckpointSizes, other_bits: int) -> int:
    """The fixed part with the other decoder weights at `other_bits`."""
    return sizes.fixed - sum(block[16] - block[other_bits] for block in sizes.others.values())


def smallest(sizes: CheckpointSizes, floors: dict[int, list[int]], novices: bool = False) -> int:
    """The smallest saved size any allocation reaches: every layer at its fewest experts and fewest bits, or dropped (one
    left routing), the other weights at their fewest bits too."""
    low = min(other_widths(sizes))
    return reachable(table(sizes, layer_choices(sizes, floors, (min(BITS),)), None, novices, low), fixed_bytes(sizes, low))


def stages_for(allocation: dict[int, Choice], sizes: CheckpointSizes, method: FitMethod, other_bits: int = 16) -> list[Stage]:
    """The stages that make `allocation`: an explicit prune where a layer removes experts (on the original, whose
    statistics the proxies read: a dropped layer keeps every expert there), a drop of the dropped blocks (by the
    original's indices: the prune does not renumber), a drop of the dropped layers' MoE (after the blocks: a model whose
    MoE sub-layers are gone may not rebuild from its config without blocks), then a quantize where bits drop (scope "all" at `other_bits` when the other decoder weights are lowered, every remaining MoE layer
    at another width named, and every expert at another width of a layer whose experts differ, by its number after
    the prune: `Choice.wider`) -- the last two keyed by the layer's index once the blocks are dropped, the model they see."""
    stages: list[Stage] = []
    left = {i: c for i, c in allocation.items() if not c.dropped}
    if any(c.keep < sizes.layers[i].experts for i, c in left.items()):
        stages.append(method.prune(budget="explicit", keep={i: sizes.layers[i].experts if c.dropped else c.keep for i, c in allocation.items()}))
    blocks = sorted(i for i, c in allocation.items() if c.block)
    moe = sorted(i - sum(b < i for b in blocks) for i, c in allocation.items() if c.dropped and not c.block)
    if blocks:
        stages.append(Drop(unit="block", layers=blocks))
    if moe:
        stages.append(Drop(layers=moe))
    allocation = {i - sum(b < i for b in blocks): c for i, c in left.items()}
    widths = [c.bits for c in allocation.values()]
    if other_bits != 16:
        named = _named(allocation, other_bits)
        stages.append(Quantize(bits=other_bits, scope="all", **({"expert_bits": named} if named else {})))
    elif set(widths) != {16}:
        # the commonest lowered width is the stage's own; every layer at another width is named
        default = max(sorted({b for b in widths if b != 16}), key=widths.count)
        named = _named(allocation, default)
        stages.append(Quantize(bits=default, scope="experts", **({"expert_bits": named} if named else {})))
    return stages


def _named(allocation: dict[int, Choice], default: int) -> dict[int, int | dict[int, int]]:
    """The quantize stage's `expert_bits` besides its `default` width: a layer's width, or its experts' where they differ."""
    named: dict[int, int | dict[int, int]] = {}
    for i, c in allocation.items():
        if c.wider:
            named[i] = {e: w for e, w in c.widths().items() if w != default}
        elif c.bits != default:
            named[i] = c.bits
    return named


def predicted_bytes(stages: list[Stage], sizes: CheckpointSizes) -> int:
    footprint = Footprint.of(sizes)
    for stage in stages:
        footprint = stage.predict(footprint)
    return footprint.bytes


def _candidate(name: str, picked: Allocation, choices: dict[int, list[Choice]], sizes: CheckpointSizes, method: FitMethod, other_bits: int,
               other_cost: float) -> Candidate:
    allocation = {layer: choices[layer][j] for layer, j in zip(choices, picked.choices)}
    stages = stages_for(allocation, sizes, method, other_bits)
    assert predicted_bytes(stages, sizes) == picked.bytes, "the stages' prediction disagrees with the solver's table"
    return Candidate(name, allocation, picked.bytes, picked.cost + other_cost, stages, other_bits=other_bits)


def solved(sizes: CheckpointSizes, floors: dict[int, list[int]], proxies: dict[int, LayerProxy], budget: int, method: FitMethod,
           others: dict[int, float]) -> list[Candidate]:
    """The solver's optimum per width table (one table over every width with `PER_LAYER_BITS`) at every width of the
    other weights (`others`: width -> proxy cost) that reaches the budget, the least total proxy first, and
    `FRONT_POINTS` front points under the budget beside the best of all.

    Every width of the other weights is measured, not only the cheapest by proxy: their proxy is a weight-space
    estimate (`proxies.other_costs`) on another scale than the experts' costs, and it was seen to rank them wrongly
    (ref-deepseek at 50 %: the optimum with them at 8 bits measured worse than the one with them as stored);
    the race stops the losers on a slice."""
    tables = [BITS] if PER_LAYER_BITS else [(b,) for b in BITS]
    found: list[tuple[list[Candidate], dict[int, list[list[Option]]], dict[int, list[Choice]]]] = []
    for widths in tables:
        choices = layer_choices(sizes, floors, widths, proxies)
        priced = costs(choices, proxies)
        # per width of the other weights: a dropped block frees them at that width
        rows = {bits: table_rows(sizes, choices, priced, method.substitutes, bits) for bits in other_widths(sizes)}
        name = "fit" if PER_LAYER_BITS else f"fit, {widths[0]}-bit"
        options = sorted((_candidate(name, optimum(rows[bits], budget, fixed_bytes(sizes, bits)), choices, sizes, method, bits, others[bits])
                          for bits in other_widths(sizes) if reachable(rows[bits], fixed_bytes(sizes, bits)) <= budget), key=lambda c: c.proxy)
        for option in options[1:]:
            option.name = f"{name}, other weights {option.other_bits}-bit"
        if options:
            found.append((options, rows, choices))
    best_options, rows, choices = min(found, key=lambda entry: entry[0][0].proxy)
    best = best_options[0]
    fixed = fixed_bytes(sizes, best.other_bits)
    nearby = [point for point in front(rows[best.other_bits], fixed)
              if point.bytes <= budget and _routing(point) and point.labels != tuple(c.label for c in best.allocation.values())]
    extra = [_candidate(f"{best.name} (front {n})", point, choices, sizes, method, best.other_bits, others[best.other_bits])
             for n, point in enumerate(nearby[:FRONT_POINTS], 1)]
    return [candidate for options, _, _ in found for candidate in options] + extra


def single_methods(sizes: CheckpointSizes, floors: dict[int, list[int]], proxies: dict[int, LayerProxy], budget: int, method: FitMethod,
                   others: dict[int, float]) -> list[Candidate]:
    """The method alone at the smallest layer ratio that fits (one kept count for every layer), and each width alone
    (the routed experts, or where that does not fit every decoder weight), where they fit."""
    found = []
    experts = {layer.experts for layer in sizes.layers.values()}
    counts = set.intersection(*(set(f) for f in floors.values())) if len(experts) == 1 else set()
    for keep in sorted(counts, reverse=True):
        allocation = {layer: Choice(keep, 16) for layer in sizes.layers}
        size = sizes.fixed + sum(candidate_bytes(sizes.layers[i], c.keep, c.bits, method.substitutes) for i, c in allocation.items())
        (total,) = experts
        if size <= budget and keep < total:
            ratio = 1 - keep / total
            stages: list[Stage] = [method.prune(ratio=ratio)]
            assert predicted_bytes(stages, sizes) == size
            found.append(Candidate(f"{method} alone, ratio {ratio:.3g}", allocation, size, _proxy(proxies, allocation), stages))
            break
    for bits in BITS[1:]:
        allocation = {layer: Choice(sizes.layers[layer].experts, bits) for layer in sizes.layers}
        for other_bits, name in ((16, f"{bits}-bit alone"), (bits, f"{bits}-bit alone, every decoder weight")):
            stages = stages_for(allocation, sizes, method, other_bits)
            size = predicted_bytes(stages, sizes)
            if size <= budget and other_bits in other_widths(sizes):
                found.append(Candidate(name, allocation, size, _proxy(proxies, allocation) + others[other_bits], stages, other_bits=other_bits))
                break
    return found


def _proxy(proxies: dict[int, LayerProxy], allocation: dict[int, Choice]) -> float:
    return sum(proxies[layer].cost(c.keep, c.bits) for layer, c in allocation.items())


def candidates(sizes: CheckpointSizes, floors: dict[int, list[int]], proxies: dict[int, LayerProxy], budget: int, method: FitMethod,
               others: dict[int, float]) -> list[Candidate]:
    """What to measure, in order (see the module docstring); equal allocations are measured once, under their first name.
    `others`: the other decoder weights' proxy cost per width (`proxies.other_costs`; {16: 0.0} where they stay)."""
    unique: dict[tuple, Candidate] = {}
    for candidate in [*solved(sizes, floors, proxies, budget, method, others), *single_methods(sizes, floors, proxies, budget, method, others)]:
        first = unique.setdefault(candidate.key, candidate)
        if first is not candidate:
            first.aliases.append(candidate.name)
    return list(unique.values())


def sweep(sizes: CheckpointSizes, floors: dict[int, list[int]], proxies: dict[int, LayerProxy], novices: bool = False) -> dict[int, list[Allocation]]:
    """The predicted quality-vs-size curve per width table, from the statistics alone (the solver's front)."""
    tables = [BITS] if PER_LAYER_BITS else [(b,) for b in BITS]
    return {widths[0] if len(widths) == 1 else 0: [point for point in front(table(sizes, layer_choices(sizes, floors, widths, proxies), proxies, novices), sizes.fixed)
                                                   if _routing(point)] for widths in tables}
