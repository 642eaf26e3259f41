"""Racing the candidates on the held-out windows: successive halving, so that losers cost a slice, not the whole set.

Every candidate is measured on a first slice of the windows (`RACE_FIRST` of them, the slices then
doubling: 1/8, 1/8, 1/4, 1/2 of the set); after each slice, a candidate whose KL is clearly worse
than the leader's on the same windows is stopped; the others go on to the next slice, until the
full set decides among those left. The race compares per-window ratios, not differences: for each
window both have seen, the log of the candidate's KL per token over the leader's. KL varies across
windows by far more than candidates differ on one window, and a difference test lets the windows of
large KL set the noise for all; the ratio is scale-free, so a candidate consistently a few per cent off
is told apart on fewer windows (on the reference models' six budget cells, replaying every candidate's
per-window KL through both tests: 600 candidate-windows against 624, the same winner in each cell, and
ref-deepseek at 50 % 144 against 168: "4-bit alone", 12 % worse, is stopped at 24 windows, not measured
to 48). "Clearly worse": the mean log ratio exceeds `RACE_Z` standard errors of the log ratios. A
candidate is stopped too when it cannot be much better than the leader: when, at the same `RACE_Z`
standard errors, its KL is bounded below by (1 - `RACE_TOLERANCE`) times the leader's (an indifference
zone, as in ranking-and-selection procedures: near-ties cost every window to tell apart, for a
difference no user would pay for; on the reference models at 50 % of their bytes, three candidates
within 2.5 % of each other were measured to the end). So the winner is, with that confidence, within
`RACE_TOLERANCE` of the best candidate's KL (as the typical per-window ratio); `RACE_TOLERANCE = 0` races
to the exact winner. The winner, and every candidate not stopped, is measured on every window, so
its figures are those a full measurement gives (`WindowScores` sums window by window, whatever the
slices), and the winner is the one of least KL over every window. Deterministic: the same windows,
candidates and models give the same race.

A survivor is kept built from one slice to the next when the caller says memory holds it (`hold`: how
many built candidates may be held at once; the fit holds what half the free memory takes, counted in
copies of the model), and otherwise rebuilt for each slice (a copy of the model and its stages: on the
reference models about a fifth of a full measurement), so memory stays at the original and one
candidate, as without the race; the last one left is built once for all the windows it still needs.
Held or rebuilt, a candidate is the same model: the figures do not depend on `hold`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from transformers import PreTrainedModel

from ..text.format import human_bytes
from .measure import Reference, WindowScores
from .search import Candidate

#: The first slice, as a fraction of the held-out windows; each later slice is as large as everything before it.
RACE_FIRST = 1 / 8
#: Standard errors of the paired per-window KL differences past which a candidate is clearly worse than the leader.
RACE_Z = 3.0
#: The indifference zone: a candidate whose advantage over the leader is, at `RACE_Z` standard errors, below this
#: share of the leader's KL is stopped (0: only clearly worse ones are).
RACE_TOLERANCE = 0.05
#: The KL per token a window of KL 0 counts at in a log ratio (far below any rounding's: only an unchanged model has it).
KL_FLOOR = 1e-12


def slice_bounds(windows: int, domains: int, first: float | None = None) -> list[int]:
    """Where each slice ends (cumulative windows): `first` of them, then doubling up to all; each bound a multiple
    of `domains` (the windows are interleaved by domain, so every slice holds each domain alike) but the last."""
    first = RACE_FIRST if first is None else first
    bounds, fraction = [], first
    while fraction < 1:
        bound = int(windows * fraction) // domains * domains
        if bound > (bounds[-1] if bounds else 0):
            bounds.append(bound)
        fraction *= 2
    return [*bounds, windows] if not bounds or bounds[-1] < windows else bounds


def _paired(mine: WindowScores, leader: WindowScores) -> tuple[float, float] | None:
    """Mean and standard error of the log of `mine`'s per-window KL per token over `leader`'s, on the windows both
    measured (None below 2). A window where a side's KL is 0 (a model that equals the original) counts at `KL_FLOOR`."""
    ratios = [math.log(max(a / t, KL_FLOOR) / max(b / u, KL_FLOOR)) for a, t, b, u in zip(mine.kl, mine.tokens, leader.kl, leader.tokens)]
    n = len(ratios)
    if n < 2:
        return None
    mean = sum(ratios) / n
    return mean, math.sqrt(sum((r - mean) ** 2 for r in ratios) / (n - 1)) / math.sqrt(n)


def clearly_worse(mine: WindowScores, leader: WindowScores) -> bool:
    """Whether `mine`'s KL exceeds `leader`'s, window by window, by more than `RACE_Z` standard errors of the log ratios."""
    paired = _paired(mine, leader)
    return paired is not None and paired[0] > RACE_Z * paired[1]


def not_much_better(mine: WindowScores, leader: WindowScores) -> bool:
    """Whether `mine`'s KL is, at `RACE_Z` standard errors of the per-window log ratios, at least (1 - `RACE_TOLERANCE`)
    times `leader`'s: its largest plausible advantage, exp(mean - `RACE_Z` x error), within the indifference zone."""
    paired = _paired(mine, leader)
    return paired is not None and paired[0] - RACE_Z * paired[1] > math.log1p(-RACE_TOLERANCE)


def time_left(spent: float, measured: int, remaining: int) -> str:
    """The time `remaining` candidate-windows take at the pace of the `measured` ones so far (builds included)."""
    seconds = spent / measured * remaining
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def race(candidates: list[Candidate], build: Callable[[int, Candidate], PreTrainedModel], reference: Reference, original: PreTrainedModel,
         say: Callable[[str], None], hold: int = 0) -> Candidate:
    """Measure `candidates` (`build(number, candidate)` gives the model, `number` counting builds) by successive
    halving on `reference`'s slices; fills each `measured` (with the windows it was measured on, and for one
    stopped early the winner's KL on those windows) and returns the winner: least KL on every window, fewer bytes on a tie, the earlier candidate then."""
    scores = {id(c): WindowScores() for c in candidates}
    alive, builds, slices = list(candidates), 0, len(reference.slices)
    held: dict[int, PreTrainedModel] = {}  # candidates kept built for the next slice (at most `hold`)
    total, start = reference.windows, time.perf_counter()
    for step in range(slices):
        # the last one left measures every slice it still needs at once: one build
        steps = range(step, slices) if len(alive) == 1 else range(step, step + 1)
        for candidate in alive:
            model = held.pop(id(candidate), None)
            if model is None:
                builds += 1
                model = build(builds, candidate)
            scores[id(candidate)].extend(reference.scores(model, original, steps))
            if len(held) < hold:
                held[id(candidate)] = model
            del model
        seen = scores[id(alive[0])].windows
        leader = min(alive, key=lambda c: (scores[id(c)].mean_kl(), c.bytes))
        say(f"measured {len(alive)} candidate(s) on {seen} of {total} held-out windows; leading: {leader.name}, KL {scores[id(leader)].mean_kl():.4g}")
        if seen == total:
            break
        others = [c for c in alive if c is not leader]
        worse = [c for c in others if clearly_worse(scores[id(c)], scores[id(leader)])]
        close = [c for c in others if all(c is not w for w in worse) and not_much_better(scores[id(c)], scores[id(leader)])]
        for candidate, why in [*((c, "clearly worse than") for c in worse), *((c, f"within {RACE_TOLERANCE:.0%} at best of") for c in close)]:
            say(f"stopped {candidate.name} ({human_bytes(candidate.bytes)}) after {seen} windows: KL {scores[id(candidate)].mean_kl():.4g}, "
                f"{why} {leader.name}'s {scores[id(leader)].mean_kl():.4g} on the same windows")
        stopped = worse + close
        for candidate in stopped:
            held.pop(id(candidate), None)
        alive = [c for c in alive if all(c is not s for s in stopped)]
        measured = sum(scores[id(c)].windows for c in candidates)
        say(f"at most ~{time_left(time.perf_counter() - start, measured, len(alive) * (total - seen))} left: "
            f"{len(alive)} candidate(s) on the {total - seen} windows to go")
    first = reference.slice_windows(0)
    for candidate in candidates:
        mine = scores[id(candidate)]
        candidate.measured = {**mine.summary(), "windows": mine.windows, "first_slice_kl": mine.mean_kl(first)}
    best = min(alive, key=lambda c: (c.measured["kl"], c.bytes))
    for candidate in candidates:  # a stopped candidate beside the winner on the same windows
        if candidate.measured["windows"] < total:
            candidate.measured["chosen_kl_same_windows"] = scores[id(best)].mean_kl(candidate.measured["windows"])
    say(f"chosen: {best.name}, KL {best.measured['kl']:.4g}, top-1 {best.measured['top1']:.3f}, ppl {best.measured['perplexity']:.3f} "
        f"on all {total} windows ({sum(c.measured['windows'] < total for c in candidates)} of {len(candidates)} candidates stopped early)")
    return best
