"""Quality before and after a compression command: perplexity on the evaluation protocol's windows,
and for a uniform rounding of a global plan, both plans' perplexity and fidelity to the original.

What `prune --eval` and `slim --eval` measure, callable from Python with the same results.
"""

from __future__ import annotations

import copy
from typing import Any

from .protocol import EvalProtocol, expand_sources


def eval_sets(protocol: EvalProtocol, sources: str | list[str] | None, tokenizer, config, option: str = "protocol.seq_len") -> dict:
    """Source -> its protocol windows ('bundled' expands to one source per domain); {} without sources."""
    return {source: protocol.windows_of(tokenizer, source, config, option) for source in expand_sources(sources)} if sources else {}


def perplexities(model, windows: dict, weights=None, device: str = "cpu", when: str = "") -> dict[str, float]:
    """Source -> perplexity of `model` on its windows; `when` labels the progress line (before, after)."""
    from .lm_perplexity import perplexity

    label = f" ({when})" if when else ""
    return {source: perplexity(model, w, weights=weights, device=device, description=f"perplexity {source}{label}").perplexity
            for source, w in windows.items()}


def perplexities_after(result, windows: dict, device: str) -> dict[str, float]:
    """Perplexities of a compression result: the model in memory, or the checkpoint a streamed run wrote."""
    from ..source.load import load_streamed

    if not windows:
        return {}
    if result.model is not None:
        return perplexities(result.model, windows, when="after")
    weights, _ = load_streamed(result.output_dir)
    return perplexities(weights.model, windows, weights, device, "after")


def measure_uniform(result, original, original_weights, windows: dict, after: dict[str, float], device: str) -> None:
    """Perplexity and fidelity against the original of the saved uniform model and of the global plan it was
    rounded from, into `result.summary["uniform"]`. The global plan is applied to a copy of the original in
    memory; a streamed run holds no model to apply it to, so there only the saved model is measured."""
    from ..arch import get_adapter
    from ..source.load import load_streamed
    from ..surgery.experts import apply_plan
    from .fidelity import fidelity

    def quality(model, weights, measured_perplexity: dict[str, float]) -> dict[str, Any]:
        measured = {s: fidelity(model, original, w, weights=weights, original_weights=original_weights, device=device)
                    for s, w in windows.items()}
        return {"perplexity": measured_perplexity, "kl": {s: f.kl for s, f in measured.items()},
                "top1_agreement": {s: f.top1_agreement for s, f in measured.items()}}

    plans = result.summary["uniform"]
    if result.model is not None:
        plans["uniform"] |= quality(result.model, None, after)
        shaped = copy.deepcopy(original)
        apply_plan(shaped, result.global_plan, get_adapter(shaped))
        plans["global"] |= quality(shaped, None, perplexities(shaped, windows, when="global plan"))
    else:
        saved, _ = load_streamed(result.output_dir)
        plans["uniform"] |= quality(saved.model, saved, after)
        plans["global"]["note"] = "The global plan's quality is not measured in a streamed run (no model is held in memory to apply it to)."
