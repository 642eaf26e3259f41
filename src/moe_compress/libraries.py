"""torch and transformers' modelling code, imported up front by a command that runs a model (the first step of eval,
fit and every stage command that imports them: `EvaluationSettings.request`, `fit_command`, `build_stage`), with
Python's cyclic garbage collector paused while they load.

Importing them makes some 400,000 objects that live as long as the process. The collector, started by allocation
counts, traverses every tracked object each time their number has grown by a quarter: six full collections while
they load, which found at most ~100 objects to free each time; start-up and these imports took 4.4-5.0 CPU s with
them and 3.1-3.2 without (bench/results/speed.md, part b). Merely re-enabling the collector afterwards would give
much of that back: everything made meanwhile would still be young, and the next collections would traverse it all
once per generation. `gc.freeze` moves it out of the generations instead, so no later collection walks it.
"""

import gc
import sys


def import_model_libraries() -> None:
    """Import torch and transformers' `PreTrainedModel` (what reading any model imports first) with the collector
    paused, freeze what they made, and let the collector run as it did before. Where they are imported already (a
    caller in Python, tests) it does nothing: there is nothing to save, and the caller's objects are not frozen."""
    if "transformers.modeling_utils" in sys.modules:
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        import torch  # noqa: F401
        import transformers.modeling_utils  # noqa: F401
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
