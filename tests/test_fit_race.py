"""fit's race: successive halving over held-out slices picks the winner a full measurement picks, with its full-set figures."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch

from moe_compress.fitting import race as fit_race
from moe_compress.fitting.api import FitResult
from moe_compress.fitting.measure import Reference, WindowScores
from moe_compress.fitting.race import clearly_worse, not_much_better, race, slice_bounds, time_left
from moe_compress.fitting.report import markdown, report_dict
from moe_compress.fitting.search import Candidate, Choice
from moe_compress.fitting.simulate import simulate
from moe_compress.source.load import load_model
from moe_compress.stages.quantize import Quantize
from moe_compress.stages.sizes import checkpoint_sizes
from tiny_checkpoints import save_tiny_checkpoint

WINDOWS = 48
TOKENS = 10  # predicted tokens per window
Z = fit_race.RACE_Z  # the library's threshold, before a test replaces it


def _kl(name: str, window: int) -> float:
    """Per-token KL of each hand-made candidate on each window. "close" leads "best" on the first 12 windows, by
    less than its noise (so the race must not stop "best" there), and is worse after; "worse" is 10 % worse on
    every window, give or take; "awful" is far off; "noisy" is a little better than "best" on every other window
    and much worse on the rest."""
    wobble = 0.01 * ((window * 7) % 5 - 2)  # -0.02 .. 0.02, the same pattern for every candidate
    return {
        "best": 1.0,
        "close": 0.99 + (0.05 if window % 2 else -0.05) if window < 12 else 1.05,
        "worse": 1.1 + 0.005 * (window % 3),
        "awful": 50.0,
        "noisy": 0.98 if window % 2 else 1.5,
    }[name] + wobble


def _candidates() -> list[Candidate]:
    sizes = {"noisy": (90, 0.4), "close": (100, 0.2), "best": (100, 0.1), "worse": (80, 0.3), "awful": (60, 0.5)}
    return [Candidate(name, {0: Choice(4, 16)}, size, proxy, []) for name, (size, proxy) in sizes.items()]


def _reference() -> Reference:
    windows = torch.zeros(WINDOWS, TOKENS + 1, dtype=torch.long)
    bounds = slice_bounds(WINDOWS, 3)
    return Reference([windows[a:b] for a, b in zip([0, *bounds], bounds)], None, [[i] for i in range(len(bounds))])


def _fake_scores(self: Reference, model: str, original, slices: range | None = None) -> WindowScores:
    """What `Reference.scores` would give for the hand-made candidate `model` (its name) on the windows of `slices`."""
    scores = WindowScores()
    start = sum(self.slice_windows(n) for n in range(slices[0]))
    for w in range(start, start + sum(self.slice_windows(n) for n in slices)):
        scores.kl.append(_kl(model, w) * TOKENS)
        scores.agree.append(TOKENS - 1)
        scores.tokens.append(TOKENS)
        scores.nll.append(2.0 * TOKENS)
        scores.nll_reference.append(1.5 * TOKENS)
    return scores


def _race(monkeypatch, z: float, tolerance: float = 0.0, hold: int = 0) -> tuple[Candidate, list[Candidate], list[str], list[str]]:
    monkeypatch.setattr(Reference, "scores", _fake_scores)
    monkeypatch.setattr(fit_race, "RACE_Z", z)
    monkeypatch.setattr(fit_race, "RACE_TOLERANCE", tolerance)
    candidates, built, said = _candidates(), [], []
    winner = race(candidates, lambda number, c: built.append(c.name) or c.name, _reference(), None, said.append, hold)
    return winner, candidates, built, said


def test_slice_bounds_by_hand():
    assert slice_bounds(48, 3) == [6, 12, 24, 48]
    assert slice_bounds(6, 3) == [3, 6]  # 1/8 and 1/4 of 6 hold no whole round of the 3 domains
    assert slice_bounds(3, 3) == [3]
    assert slice_bounds(50, 3) == [6, 12, 24, 50]
    assert slice_bounds(48, 3, first=1 / 2) == [24, 48]


def test_clearly_worse_by_hand():
    def scores(kls: list[float]) -> WindowScores:
        return WindowScores(kls, [0] * len(kls), [1] * len(kls), [0.0] * len(kls), [0.0] * len(kls))

    leader = scores([1.0, 1.2, 0.9, 1.1])
    # log ratios 0.049, 0.041, 0.054, 0.045: mean 0.047, standard error 0.0028
    assert clearly_worse(scores([1.05, 1.25, 0.95, 1.15]), leader)
    assert not clearly_worse(scores([0.5, 3.0, 0.4, 2.0]), leader)  # worse on average, not consistently
    assert not clearly_worse(scores([1.0, 1.2, 0.9, 1.1]), leader)
    assert not clearly_worse(scores([9.0]), scores([1.0]))  # one window says nothing


def test_the_race_judges_ratios_so_windows_of_large_kl_do_not_drown_a_consistent_gap():
    def scores(kls: list[float]) -> WindowScores:
        return WindowScores(kls, [0] * len(kls), [1] * len(kls), [0.0] * len(kls), [0.0] * len(kls))

    # the leader's KL per window spans two decades; the candidate is 4-6 % worse on every one of them
    leader = scores([0.01, 0.5, 0.02, 1.0, 0.05, 0.2])
    worse = scores([0.0104, 0.53, 0.0208, 1.06, 0.0525, 0.208])
    differences = [a - b for a, b in zip(worse.kl, leader.kl)]  # 0.0004 .. 0.06: their mean is within 3 standard errors
    mean = sum(differences) / 6
    spread = math.sqrt(sum((d - mean) ** 2 for d in differences) / 5 / 6)
    assert mean < fit_race.RACE_Z * spread
    assert clearly_worse(worse, leader)  # the log ratios, 0.039 .. 0.058, are not
    # a window of KL 0 (an unchanged model) counts at the floor, on either side
    assert clearly_worse(scores([0.3, 0.2, 0.4]), scores([0.0, 0.0, 0.0]))
    assert not clearly_worse(scores([0.0, 0.0, 0.0]), scores([0.3, 0.2, 0.4]))


def test_time_left_at_the_pace_so_far():
    assert time_left(10.0, 20, 30) == "15 s"  # 0.5 s a candidate-window
    assert time_left(100.0, 10, 20) == "3 min"  # 200 s


def test_not_much_better_by_hand():
    def scores(kls: list[float]) -> WindowScores:
        return WindowScores(kls, [0] * len(kls), [1] * len(kls), [0.0] * len(kls), [0.0] * len(kls))

    leader = scores([1.0, 1.2, 0.9, 1.1])  # KL 1.05: the zone is 0.0525 wide
    # 0.01 better on every window: log ratios -0.010, -0.0084, -0.011, -0.0091, its advantage bounded by ~1.2 %
    assert not_much_better(scores([0.99, 1.19, 0.89, 1.09]), leader)
    assert not not_much_better(scores([0.9, 1.1, 0.8, 1.0]), leader)  # ~10 % better: outside the zone (log(0.95) = -0.0513)
    # log ratios 0, 0.0247, -0.0112, 0.0180: mean 0.0079, standard error 0.0082; at best 0.0079 - 3 x 0.0082 = -0.017
    assert not_much_better(scores([1.0, 1.23, 0.89, 1.12]), leader)
    assert not not_much_better(scores([1.0, 1.23, 0.89, 1.02]), leader)  # mean -0.016, error 0.021: at best -0.080
    assert not not_much_better(scores([0.5, 3.0, 0.4, 2.0]), leader)  # too noisy to bound
    assert not not_much_better(scores([1.0]), scores([1.0]))  # one window says nothing


def test_the_indifference_zone_stops_a_near_tie_and_keeps_the_winner_within_it(monkeypatch):
    exact, full, _, _ = _race(monkeypatch, Z)
    winner, raced, built, said = _race(monkeypatch, Z, tolerance=0.05)
    windows = {c.name: c.measured["windows"] for c in raced}
    # "close" leads on the first 12 windows and can then be no more than 5 % worse than "best" (at 3 standard
    # errors): "best" is stopped as a near tie, and "close" -- 3.5 % worse on the full set -- is chosen
    assert windows == {"noisy": 12, "close": 48, "best": 12, "worse": 6, "awful": 6}
    assert winner.name == "close" and exact.name == "best"
    assert exact.measured["kl"] < winner.measured["kl"] <= 1.05 * exact.measured["kl"]
    assert any(line.startswith("stopped best (100 B) after 12 windows") and "within 5% at best of close's" in line for line in said)
    assert len(built) < 4 * len(raced)


def test_race_picks_the_full_measurements_winner_with_its_full_figures(monkeypatch):
    full_winner, full, full_built, _ = _race(monkeypatch, math.inf)  # never stops: every candidate on every window
    assert full_built == [c.name for c in full] * 4 and all(c.measured["windows"] == WINDOWS for c in full)
    assert full_winner.name == "best"

    winner, raced, built, said = _race(monkeypatch, Z)
    assert winner.name == "best" and winner.measured == full_winner.measured
    assert winner.measured["kl"] == sum(_kl("best", w) for w in range(WINDOWS)) / WINDOWS
    windows = {c.name: c.measured["windows"] for c in raced}
    # "worse" and "awful" stopped on the first slice (6 windows); "noisy" after 24, its gap then outgrowing its noise;
    # "close" led on the first 12 windows and lost on the full set: measured to the end, as the winner
    assert windows == {"noisy": 24, "close": 48, "best": 48, "worse": 6, "awful": 6}
    assert built == ["noisy", "close", "best", "worse", "awful", *["noisy", "close", "best"] * 2, "close", "best"]
    for c in raced:
        assert c.measured["kl"] == pytest.approx(sum(_kl(c.name, w) for w in range(windows[c.name])) / windows[c.name], rel=1e-12)
        assert c.measured["first_slice_kl"] == pytest.approx(sum(_kl(c.name, w) for w in range(6)) / 6, rel=1e-12)
        assert c.measured["top1"] == 0.9 and c.measured["perplexity"] == pytest.approx(math.exp(2.0))
    assert "stopped worse (80 B) after 6 windows" in said[1] and said[-1].startswith("chosen: best, KL 1,")
    assert re.fullmatch(r"at most ~\d+ s left: 3 candidate\(s\) on the 42 windows to go", said[3])
    assert [c.name for c in raced if c.measured != next(f for f in full if f.name == c.name).measured] == ["noisy", "worse", "awful"]

    result = FitResult(1000, 100, 0, 10, {0: [2, 4]}, candidates=raced, best=winner)
    report = report_dict(result)
    assert report["held_out_windows"] == WINDOWS
    assert report["stopped_early"] == [{"name": "noisy", "windows": 24}, {"name": "worse", "windows": 6}, {"name": "awful", "windows": 6}]
    # on the first slice (every candidate's 6 windows) KL ranks close < best < worse < noisy < awful, the proxy
    # best < close < worse < noisy < awful: one swap, 1 - 6 x 2 / (5 x 24)
    assert report["spearman_proxy_vs_kl"] == pytest.approx(0.9)
    text = markdown(report)
    worse = sum(_kl("worse", w) for w in range(6)) / 6
    assert f"| worse | 80 | 0.3 | {worse:.4g} | 0.9000 | 7.389 | 6 (stopped early) |" in text
    assert f"| best **chosen** | 100 | 0.1 | {winner.measured['kl']:.4g} | 0.9000 | 7.389 | 48 |" in text
    best_on_6 = sum(_kl("best", w) for w in range(6)) / 6
    assert next(c for c in raced if c.name == "worse").measured["chosen_kl_same_windows"] == pytest.approx(best_on_6, rel=1e-12)
    assert "chosen_kl_same_windows" not in winner.measured


def test_held_survivors_are_built_once_and_measure_the_same(monkeypatch):
    rebuilt, raced, built_each_slice, _ = _race(monkeypatch, Z)
    winner, held, built, _ = _race(monkeypatch, Z, hold=len(raced))
    assert built == [c.name for c in held]  # every candidate built once, in the first slice
    assert winner.name == rebuilt.name and [c.measured for c in held] == [c.measured for c in raced]
    # holding one: the first built ("noisy") is kept until it is stopped after 24 windows; then "close" on the last slice
    _, _, some, _ = _race(monkeypatch, Z, hold=1)
    assert some == ["noisy", "close", "best", "worse", "awful", *["close", "best"] * 3]
    assert len(built_each_slice) == len(some) + 2


def test_a_lone_candidate_is_built_once(monkeypatch):
    monkeypatch.setattr(Reference, "scores", _fake_scores)
    built = []
    only = _candidates()[2:3]
    assert race(only, lambda number, c: built.append(number) or c.name, _reference(), None, lambda line: None) is only[0]
    assert built == [1] and only[0].measured["windows"] == WINDOWS


def test_sliced_reference_scores_as_the_whole(tmp_path):
    """The same windows measured slice by slice (batches cut at the slices) give the figures of one measurement over all."""
    source = save_tiny_checkpoint(tmp_path / "source", "mixtral")
    original, _ = load_model(str(source))
    candidate = copy.deepcopy(original)
    simulate(candidate, Quantize(bits=4, scope="experts"), checkpoint_sizes(source).group_size)
    windows = torch.randint(0, 300, (12, 24), generator=torch.Generator().manual_seed(3))
    whole = Reference.of(original, windows).compare(candidate, original)
    sliced = Reference.of(original, windows, slice_bounds(12, 3))
    assert sliced.slices == [[0], [1], [2]] and [b.shape[0] for b in sliced.batches] == [3, 3, 6]
    scores = WindowScores()
    for number in range(3):
        scores.extend(sliced.scores(candidate, original, range(number, number + 1)))
    assert scores.windows == 12 and scores.summary() == pytest.approx(whole, rel=1e-6) and whole["kl"] > 0


def test_the_chosen_against_the_best_single_method():
    """A single method measured on every window is compared on its full KL; one the race stopped counts as beaten,
    and the line shows the chosen candidate's KL on the same windows."""
    from moe_compress.fitting.report import versus_single_methods
    from moe_compress.text.fit_card import versus_line

    def row(name, kl, windows, aliases=(), **more):
        return {"name": name, "aliases": list(aliases), "kl": kl, "top1": 0.9, "windows": windows, "first_slice_kl": kl, **more}

    report = {"chosen": "fit", "held_out_windows": 48,
              "candidates": [row("fit", 0.0012, 48), row("8-bit alone", 0.0011, 48), row("4-bit alone", 0.0013, 6, chosen_kl_same_windows=0.001)]}
    assert versus_single_methods(report) == {"strictly_below_single_methods": False, "best_single_method": "8-bit alone"}
    report["candidates"][1]["kl"] = report["candidates"][1]["first_slice_kl"] = 0.0015
    report |= versus_single_methods(report)
    assert report["strictly_below_single_methods"] is True and report["best_single_method"] == "8-bit alone"
    report["candidates"][1]["windows"] = 12  # stopped too: the best is the least KL on the first slice
    report["candidates"][1]["chosen_kl_same_windows"] = 0.0011
    report |= versus_single_methods(report)
    assert report == report | {"strictly_below_single_methods": True, "best_single_method": "4-bit alone"}
    assert versus_line(report)[0] == ("Chosen fit: KL 0.0012, top-1 0.9000 against the original; best single method measured, 4-bit alone: "
                                      "KL 0.0013, top-1 0.9000 on the first 6 windows, where the race stopped it (there, fit: KL 0.001).")
    report["candidates"][0]["aliases"] = ["4-bit alone"]  # the optimum is a single method: it beats none
    assert versus_single_methods(report)["strictly_below_single_methods"] is False
