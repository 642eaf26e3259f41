"""From sizes and proxies to the few allocations worth measuring, each as the stages that make it.

Per MoE layer the options are every (kept count, bit width) pair: bytes exact from the shard
headers (`stages.sizes.candidate_bytes`), cost from the proxies (`fitting.proxies`); with the proxies,
each such pair with the m kept experts whose rounding error falls most at a wider width b' raised to
it (`expert_choices`: m = 1, 2, 4, ... below the kept count, b' each wider width), so that slack too
small to widen a whole layer widens the experts that gain most from it; and, where its
MoE sub-layer holds nothing but routed experts and router (`droppable`), dropping it (`DROPPED`:
0 bytes, cost 1 -- every expert's energy removed), as long as one MoE layer keeps routing (`optimum`;
a family with shared experts is not offered the drop: layer drop removes them too, which the
statistics do not price). Besides, one
global choice: the width of the other decoder weights (attention, shared experts, dense MLPs;
quantize's scope "all"), 16 / 8 / 4 where the sizes know their packed bytes
(`CheckpointSizes.others`), priced by `proxies.other_costs`; it moves the fixed part. The solver
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

Each allocation becomes a list of stages -- `Prune(method, budget="explicit", keep=...)`, `Drop(layers=...)`,
then `Quantize(bits=..., scope="experts" or "all", expert_bits=...)` -- that `pipeline.run_stages` runs; their `predict`
gives the same bytes as the table (asserted), so what is measured is what fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..stages.base import Stage
from ..stages.drop import Drop
from ..stages.footprint import Footprint
from ..stages.quantize import Quantize
from ..stages.sizes import BITS, CheckpointSizes, LayerSizes, candidate_bytes
from .fit_method import FitMethod
from .proxies import LayerProxy
from .solver import Allocation, Option, front, smallest_bytes, solve

#: The solver mixes widths across layers in one table (`Quantize(expert_bits={layer: bits})`); False
#: solves once per width, every routed expert of a candidate at one width.
PER_LAYER_BITS = True
#: Front points measured beside each optimum.
FRONT_POINTS = 2


#: The table offers widths per expert (`expert_choices`); False: every kept expert of a layer at one width.
PER_EXPERT_BITS = True


@dataclass(frozen=True)
class Choice:
    """A MoE layer's experts kept and their width; `wider`: kept experts at `to` bits instead, numbered as the quantize
    stage sees them -- their place among the kept experts in ascending id, the order the prune stage keeps them in."""

    keep: int
    bits: int
    wider: tuple[int, ...] = ()
    to: int = 16

    @property
    def dropped(self) -> bool:
        return self.keep == 0

    @property
    def label(self) -> str:
        return "dropped" if self.dropped else f"{self.keep}x{self.bits}b" + (f"+{len(self.wider)}x{self.to}b" if self.wider else "")

    def widths(self) -> dict[int, int]:
        """Each kept expert's width, by its number after the prune stage."""
        return {e: self.to if e in self.wider else self.bits for e in range(self.keep)}

    def entry(self) -> dict:
        """The allocation's entry in the report: experts kept, bits, and the experts raised where some are."""
        raised = {"raised": f"{len(self.wider)} at {self.to} bits: {', '.join(map(str, self.wider))}"} if self.wider else {}
        return {"keep": self.keep, "bits": self.bits, **raised}


#: A layer's routed MoE dropped (`Drop(layers=...)`): no expert kept, no bits.
DROPPED = Choice(0, 0)


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
        return self.other_bits, tuple(sorted((i, c.keep, c.bits, c.wider, c.to) for i, c in self.allocation.items()))

    def to_dict(self) -> dict:
        return {"name": self.name, "aliases": self.aliases, "bytes": self.bytes, "proxy": self.proxy, "stages": [{s.kind: s.given()} for s in self.stages],
                "allocation": {str(i): c.entry() for i, c in self.allocation.items()}, "other_bits": self.other_bits,
                **self.measured}


def droppable(sizes: CheckpointSizes, layer: int) -> bool:
    """Whether layer drop removes exactly `layer`'s routed experts and router: its MoE sub-layer is a module of its own
    holding nothing else (shared experts would go with it, which the proxies do not price), and another MoE layer is left."""
    return sizes.moe_droppable and sizes.layers[layer].rest_bytes == 0 and len(sizes.layers) > 1


def expert_choices(proxy: LayerProxy, counts: list[int], bits: tuple[int, ...]) -> list[Choice]:
    """Per kept count (`counts`, largest first) and lowered width b, the m kept experts of largest gain at each wider width
    b' (`LayerProxy.gain_order`) raised to it, for m = 1, 2, 4, ... below the kept count: powers of two, so a layer of
    E experts adds about 3 log2(E) choices per kept count (the table, and the solver's time, stay within ~8x of whole-layer
    widths alone at 128 experts)."""
    found = []
    for b in bits:
        for k in counts:
            for to in (w for w in bits if w > b):
                order = proxy.gain_order(k, b, to)
                found += [Choice(k, b, tuple(sorted(order[:m])), to) for m in (2**n for n in range(k.bit_length())) if m < k]
    return found


def layer_choices(sizes: CheckpointSizes, floors: dict[int, list[int]], bits: tuple[int, ...],
                  proxies: dict[int, LayerProxy] | None = None) -> dict[int, list[Choice]]:
    """Every MoE layer's choices: each allowed kept count (`floors[layer]`, largest first) at each width,
    the layer unchanged first (the solver's option 0); then, with `proxies`, the per-expert widths
    (`expert_choices`: after the whole-layer ones, so those win every tie); last `DROPPED` where the layer is `droppable`."""
    def of(layer: int) -> list[Choice]:
        counts = sorted(floors[layer], reverse=True)
        raised = expert_choices(proxies[layer], counts, bits) if proxies and PER_EXPERT_BITS else []
        return [Choice(k, b) for b in bits for k in counts] + raised + ([DROPPED] if droppable(sizes, layer) else [])

    return {layer: of(layer) for layer in sorted(sizes.layers)}


def choice_bytes(layer: LayerSizes, choice: Choice, novices: bool = False) -> int:
    """A choice's bytes of the layer's routed experts and router (none left when dropped); `novices`: a substituting
    method's (MoNE: the removed experts' router rows, vectors and slot map stay, `stages.sizes.candidate_bytes`)."""
    if choice.dropped:
        return 0
    widths = {choice.bits: choice.keep - len(choice.wider), choice.to: len(choice.wider)} if choice.wider else choice.bits
    return candidate_bytes(layer, choice.keep, widths, novices)


def _costs(proxy: LayerProxy, choices: list[Choice]) -> list[float]:
    """Each choice's proxy cost: its (kept count, width)'s, computed once per pair, plus what its raised experts change."""
    whole: dict[tuple[int, int], float] = {}
    for c in choices:
        if (c.keep, c.bits) not in whole:
            whole[c.keep, c.bits] = proxy.cost(c.keep, c.bits)
    return [whole[c.keep, c.bits] + proxy.raised(c.keep, c.bits, c.wider, c.to) for c in choices]


def table(sizes: CheckpointSizes, choices: dict[int, list[Choice]], proxies: dict[int, LayerProxy] | None,
          novices: bool = False) -> list[list[Option]]:
    """The solver's table: per layer, per choice, its bytes (`choice_bytes`) and proxy cost (0 without proxies: a dry run)."""
    return [[Option(choice_bytes(sizes.layers[layer], c, novices), cost, c.label)
             for c, cost in zip(layer_choices, _costs(proxies[layer], layer_choices) if proxies else [0.0] * len(layer_choices))]
            for layer, layer_choices in choices.items()]


def _routing(allocation: Allocation) -> bool:
    """Whether an allocation leaves a MoE layer routing (a plan dropping them all is refused)."""
    return any(label != DROPPED.label for label in allocation.labels)


def _undroppable(rows: list[list[Option]], layer: int) -> list[list[Option]]:
    """`rows` with `layer` denied its drop (always its last option), the other layers' option indices unchanged."""
    return [row[:-1] if index == layer and row[-1].label == DROPPED.label else row for index, row in enumerate(rows)]


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
    """The smallest saved size any allocation reaches: every layer at its fewest experts and fewest bits, the other weights too."""
    return reachable(table(sizes, layer_choices(sizes, floors, (min(BITS),)), None, novices), fixed_bytes(sizes, min(other_widths(sizes))))


def stages_for(allocation: dict[int, Choice], sizes: CheckpointSizes, method: FitMethod, other_bits: int = 16) -> list[Stage]:
    """The stages that make `allocation`: an explicit prune where a layer removes experts (on the original, whose
    statistics the proxies read: a dropped layer keeps every expert there), a drop of the dropped layers' MoE,
    a quantize where bits drop (scope "all" at `other_bits` when the other decoder weights are lowered, every
    remaining MoE layer at another width named, and every expert at another width of a layer whose experts differ,
    by its number after the prune: `Choice.wider`)."""
    stages: list[Stage] = []
    left = {i: c for i, c in allocation.items() if not c.dropped}
    if any(c.keep < sizes.layers[i].experts for i, c in left.items()):
        stages.append(method.prune(budget="explicit", keep={i: sizes.layers[i].experts if c.dropped else c.keep for i, c in allocation.items()}))
    if len(left) < len(allocation):
        stages.append(Drop(layers=sorted(set(allocation) - set(left))))
    allocation = left
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
    found: list[tuple[list[Candidate], list[list[Option]], dict[int, list[Choice]]]] = []
    for widths in tables:
        choices = layer_choices(sizes, floors, widths, proxies)
        rows = table(sizes, choices, proxies, method.substitutes)
        name = "fit" if PER_LAYER_BITS else f"fit, {widths[0]}-bit"
        options = sorted((_candidate(name, optimum(rows, budget, fixed_bytes(sizes, bits)), choices, sizes, method, bits, others[bits])
                          for bits in other_widths(sizes) if reachable(rows, fixed_bytes(sizes, bits)) <= budget), key=lambda c: c.proxy)
        for option in options[1:]:
            option.name = f"{name}, other weights {option.other_bits}-bit"
        if options:
            found.append((options, rows, choices))
    best_options, rows, choices = min(found, key=lambda entry: entry[0][0].proxy)
    best = best_options[0]
    fixed = fixed_bytes(sizes, best.other_bits)
    nearby = [point for point in front(rows, fixed)
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
