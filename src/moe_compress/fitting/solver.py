"""Pick one option per layer so the whole fits a byte budget at the least total cost.

This is a multiple-choice knapsack: per layer a list of options (bytes, cost, label) -- experts
kept x bit width x merged or dropped, each costed by a layer-local proxy -- and the sum of the
chosen bytes plus a fixed part (embeddings, attention, ...) must not exceed the budget.

`solve` is an exact dynamic programme over bytes in units, and never exceeds the budget:
* every layer's smallest option is subtracted first, so the table spans only the slack
  (budget - smallest reachable size) and the all-smallest allocation is always in it;
* the slack is cut into at most `resolution` units and each option's extra bytes are rounded UP to whole units, so a
  rounded total within the slack is a true total within it. The price of the rounding: an
  allocation within the budget by less than a unit per layer may be missed (the tests measure
  how often against brute force); the result is optimal for the rounded sizes. By default the
  resolution is what `DP_WORK` table cells allow over every option of every layer, between
  `MIN_RESOLUTION` and `MAX_RESOLUTION` units: a small table (the reference models' few MoE layers)
  is solved to a few hundred bytes, and a large one (60 layers of thousands of options) stays a
  table of layers x 4096 costs, whatever the model's size. The resolution matters most when an
  option removes more than experts (a dropped block: see below), which widens the slack: at 4096
  units ref-mixtral's optimum at 35 % of its bytes was missed for one 1,400-byte unit a layer.
`front` is the Lagrangian sweep: every allocation minimising cost + lambda x bytes for some
lambda >= 0, i.e. the lower convex hull of (bytes, cost), found by walking each layer's own hull
in order of cost per byte saved; cheap, for the "what does each size cost" report.

An option's bytes are counted against the fixed part, so they may be negative: an option that
removes some of what the fixed part counts (a whole block dropped takes its attention and norms
with it) weighs less than nothing there; the totals, and the budget, are what is exact.

Conventions: option 0 of every layer is the layer unchanged (cost 0); a budget at or above the
unchanged size returns it as is. Ties are broken by layer index, then option order: among
equally cheap allocations the one whose first layer takes the earliest option wins, then the
second layer, and so on, so the same input always gives the same allocation and the original
wins every tie.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import MoECompressError, param
from ..text.format import human_bytes


@dataclass(frozen=True)
class Option:
    """One way to store a layer: its bytes (against the fixed part: see the module docstring), its proxy cost (>= 0),
    and a label for reports."""

    bytes: int
    cost: float
    label: str


@dataclass(frozen=True)
class Allocation:
    """One option per layer, with the true total bytes (fixed part included) and cost."""

    choices: tuple[int, ...]  # option index per layer
    labels: tuple[str, ...]
    bytes: int
    cost: float


def _allocation(layers: Sequence[Sequence[Option]], choices: Sequence[int], fixed: int) -> Allocation:
    picked = [layer[j] for layer, j in zip(layers, choices)]
    return Allocation(tuple(choices), tuple(o.label for o in picked), fixed + sum(o.bytes for o in picked), sum(o.cost for o in picked))


def _check(layers: Sequence[Sequence[Option]]) -> None:
    for index, layer in enumerate(layers):
        if not layer:
            raise MoECompressError(f"layer {index} has no options to choose from.")
        for option in layer:
            if not math.isfinite(option.cost) or option.cost < 0:
                raise MoECompressError(f"layer {index} option {option.label!r} needs a finite cost >= 0; got {option.cost}.")


def smallest_bytes(layers: Sequence[Sequence[Option]], fixed: int = 0) -> int:
    """The smallest total any allocation reaches."""
    return fixed + sum(min(o.bytes for o in layer) for layer in layers)


#: Table cells (units x options, summed over layers) the default resolution spends, and its bounds.
DP_WORK = 2**25
MIN_RESOLUTION, MAX_RESOLUTION = 4096, 2**17


def default_resolution(layers: Sequence[Sequence[Option]]) -> int:
    """The units `solve` cuts the slack into by default (see the module docstring)."""
    return min(MAX_RESOLUTION, max(MIN_RESOLUTION, DP_WORK // max(1, sum(len(layer) for layer in layers))))


def solve(layers: Sequence[Sequence[Option]], budget: int, fixed: int = 0, resolution: int | None = None) -> Allocation:
    """The cheapest allocation whose true bytes (plus `fixed`) are <= `budget` (see the module docstring)."""
    _check(layers)
    resolution = resolution or default_resolution(layers)
    original = _allocation(layers, [0] * len(layers), fixed)
    if budget >= original.bytes:
        return original
    floor = smallest_bytes(layers, fixed)
    if budget < floor:
        raise MoECompressError(
            f"the budget of {human_bytes(budget)} is below the smallest size any allocation reaches, {human_bytes(floor)}; "
            f"raise {param('memory')} (or shorten {param('context')}) or allow smaller options."
        )
    lows = [min(o.bytes for o in layer) for layer in layers]
    slack = budget - floor
    unit = max(1, math.ceil(slack / resolution))
    capacity = slack // unit
    extra = [[-(-(o.bytes - low) // unit) for o in layer] for layer, low in zip(layers, lows)]
    # best[l][c]: least cost of layers l.. within c units (suffix tables: the walk back starts at layer 0).
    best = np.full((len(layers) + 1, capacity + 1), np.inf)
    best[-1] = 0.0
    for index in range(len(layers) - 1, -1, -1):
        for option, width in zip(layers[index], extra[index]):
            if width <= capacity:
                candidate = option.cost + best[index + 1, : capacity + 1 - width]
                np.minimum(best[index, width:], candidate, out=best[index, width:])
    choices, room = [], capacity
    for index, layer in enumerate(layers):
        for j, (option, width) in enumerate(zip(layer, extra[index])):  # the first option reaching the optimum: ties by option order
            if width <= room and option.cost + best[index + 1, room - width] == best[index, room]:
                choices.append(j)
                room -= width
                break
    assert len(choices) == len(layers), "the walk back lost the optimum"
    found = _allocation(layers, choices, fixed)
    assert found.bytes <= budget, f"solver exceeded the budget: {found.bytes} > {budget}"
    return found


def _hull(layer: Sequence[Option]) -> list[int]:
    """Option indices on the layer's lower convex hull, from the cheapest to the smallest, each step
    saving bytes at the least extra cost per byte (equal slopes: the nearer point, so none is skipped)."""
    order = sorted(range(len(layer)), key=lambda j: (layer[j].cost, layer[j].bytes, j))
    path = [order[0]]
    while True:
        here = layer[path[-1]]
        steps = [((layer[j].cost - here.cost) / (here.bytes - layer[j].bytes), -layer[j].bytes, j) for j in range(len(layer)) if layer[j].bytes < here.bytes]
        if not steps:
            return path
        path.append(min(steps)[2])


def front(layers: Sequence[Sequence[Option]], fixed: int = 0) -> list[Allocation]:
    """The Lagrangian front: allocations from the cheapest to the smallest, each step the cheapest
    cost per byte saved across layers (ties: the lower layer index)."""
    _check(layers)
    hulls = [_hull(layer) for layer in layers]
    choices = [hull[0] for hull in hulls]
    steps: list[tuple[float, int, int]] = []

    def push(index: int, position: int) -> None:
        if position + 1 < len(hulls[index]):
            here, there = layers[index][hulls[index][position]], layers[index][hulls[index][position + 1]]
            heapq.heappush(steps, ((there.cost - here.cost) / (here.bytes - there.bytes), index, position + 1))

    for index in range(len(layers)):
        push(index, 0)
    allocations = [_allocation(layers, choices, fixed)]
    while steps:
        _, index, position = heapq.heappop(steps)
        choices[index] = hulls[index][position]
        allocations.append(_allocation(layers, choices, fixed))
        push(index, position)
    return allocations
