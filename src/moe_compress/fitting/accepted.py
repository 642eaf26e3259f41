"""The methods `fit` allocates with, named without importing torch: the command's --help lists them.

They are the registered methods that plan to kept counts given per layer (`Method.explicit_budget`, budget
"explicit": what `fit`'s solver chooses), every one the proxies can price (`fitting.proxies`): the pruning
criteria and C-Prune (removed experts), MoNE (removed experts replaced by their mean output), and the
merging methods (experts merged away). tests/test_fit_methods.py checks this list against the registry.
"""

from __future__ import annotations

FIT_METHODS: tuple[str, ...] = ("reap", "frequency", "soft_count", "gate_sum", "ean", "cprune", "mone", "hc-smoe", "m-smoe", "ream")
