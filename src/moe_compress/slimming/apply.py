"""Expert slimming by weight sparsity: magnitude, Wanda and SparseGPT, unstructured or N:M.

Masks are applied to the weights in place, so the model keeps its stock structure (same
shapes, zeros where weights were removed) and saves as the checkpoint it was -- stock, or
with its generated remote code if an earlier stage made it non-uniform.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import distributed
from ..arch.registry import get_adapter
from ..errors import MoECompressError
from ..sink.export import walk_groups
from ..source.open import Streaming
from ..sink.output_lock import releases_outputs
from ..source.residency import InMemoryWeights, Weights
from ..sink.save import save_with_summary
from ..progress import track
from .observe import InputStats, LayerCollector, WeightMatrix, check_targets, layer_collector, prune_layer_by_layer
from .sparsegpt import sparsegpt_prune
from .sparsity import SparsitySpec, apply_mask, magnitude_scores, make_spec, prune_mask, wanda_scores

SLIM_METHODS: dict[str, str] = {
    "magnitude": "|W|, per output row; needs no calibration data",
    "wanda": "|W_ij| * ||X_j||_2 with X the inputs this weight saw (per expert: its routed tokens)",
    "sparsegpt": "second-order (OBS) pruning with weight updates, Hessian X^T X of this weight's inputs",
}


@dataclass
class SlimResult:
    model: PreTrainedModel
    summary: dict = field(default_factory=dict)
    output_dir: Path | None = None


def prune_matrix(
    weight: torch.Tensor,
    method: str,
    spec: SparsitySpec,
    stats: InputStats | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    """The sparsified copy of one matrix [out, in].

    A matrix whose inputs were never seen (an expert no calibration token was routed to)
    has no statistics to go on: it falls back to magnitude pruning.
    """
    if method == "magnitude" or stats is None or stats.tokens == 0:
        return apply_mask(weight, prune_mask(magnitude_scores(weight.float()), spec))
    if method == "wanda":
        return apply_mask(weight, prune_mask(wanda_scores(weight.float(), stats.sq_sum), spec))
    if method == "sparsegpt":
        assert stats.xtx is not None
        return sparsegpt_prune(weight, stats.xtx, spec, blocksize, damp)
    raise MoECompressError(f"unknown slimming method {method!r}; choose one of {', '.join(SLIM_METHODS)}.")


def check_method(method: str) -> None:
    """A slimming method this module knows (the call, the stage and the command refuse the same way)."""
    if method not in SLIM_METHODS:
        raise MoECompressError(f"unknown slimming method {method!r}; choose one of {', '.join(SLIM_METHODS)}.")


class _Tally:
    """Per target kind: matrices, weights, zeros; and matrices that fell back to magnitude, with the
    (decoder layer, expert) of the routed experts among them -- what the quality guard names."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = defaultdict(lambda: {"matrices": 0, "weights": 0, "zeros": 0, "no_calibration_tokens": 0})
        self.unreached: set[tuple[int, int]] = set()

    def add(self, matrix: WeightMatrix, stats: InputStats | None, calibrated: bool, layer: int) -> None:
        value = matrix.read()
        entry = self.counts[matrix.kind]
        entry["matrices"] += 1
        entry["weights"] += value.numel()
        entry["zeros"] += int((value == 0).sum())
        without_data = calibrated and (stats is None or stats.tokens == 0)
        entry["no_calibration_tokens"] += int(without_data)
        if without_data and matrix.expert is not None:
            self.unreached.add((layer, matrix.expert))

    def unreached_names(self) -> list[str]:
        """'layer:expert' of every routed expert calibration never reached (`evaluate.guard.recorded_unreached` reads them)."""
        return [f"{layer}:{expert}" for layer, expert in sorted(self.unreached)]

    def to_dict(self) -> dict[str, dict]:
        return {kind: {**c, "sparsity": c["zeros"] / max(c["weights"], 1)} for kind, c in sorted(self.counts.items())}


def check_targets_present(model: PreTrainedModel, adapter, targets: tuple[str, ...]) -> None:
    """Fail before any calibration if the model has none of a target's weights (works on a meta skeleton)."""
    found = {m.kind for index, layer in enumerate(adapter.decoder_layers(model)) for m in layer_collector(adapter, layer, index, targets, None).matrices}
    missing = [t for t in targets if t not in found]
    if missing:
        raise MoECompressError(f"this {adapter.model_type} model has no {' or '.join(missing)} weights to sparsify; drop them from targets.")


def sparsity_walk(
    model: PreTrainedModel,
    method: str,
    spec: SparsitySpec,
    targets: tuple[str, ...],
    batches: list[torch.Tensor] | None,
    tally: _Tally,
    blocksize: int = 128,
    damp: float = 0.01,
    propagate: bool = True,
    device: str = "cpu",
    weights: Weights | None = None,
    all_experts: bool = False,
) -> Iterable[tuple[int, nn.Module]]:
    """Sparsify the target matrices layer by layer; iterating yields each layer once it is pruned.

    Wanda and SparseGPT calibrate layer by layer and prune each layer before the next is
    observed (see `prune_layer_by_layer`); magnitude needs no data. The layer is yielded while
    its weights are loaded, so a streamed run writes it out before reading the next one.
    `all_experts`: calibration reaches every routed expert (`walk.all_experts`).
    """
    adapter = get_adapter(model)
    weights = weights or InMemoryWeights(model)
    calibrated = method != "magnitude"

    def prune(collector: LayerCollector) -> None:
        for stats in collector.stats.values():
            stats.combine_ranks()
        for matrix in collector.matrices:
            stats = collector.stats.get(matrix.name)
            matrix.write(prune_matrix(matrix.read(), method, spec, stats, blocksize, damp))
            tally.add(matrix, stats, calibrated, collector.index)

    if calibrated:
        if not batches:
            raise MoECompressError(f"{method} needs calibration data; pass calib (or use method='magnitude').")
        need = "hessian" if method == "sparsegpt" else "norms"
        return prune_layer_by_layer(
            model, adapter, batches, lambda index, layer: layer_collector(adapter, layer, index, targets, need, all_experts),
            prune, device, propagate, weights=weights,
        )

    def magnitude_walk() -> Iterator[tuple[int, nn.Module]]:
        layers = adapter.decoder_layers(model)
        for index in track(range(len(layers)), "slimming layers"):
            with weights.loaded(layers[index], device) as layer:
                prune(layer_collector(adapter, layer, index, targets, None))
                yield index, layer

    return magnitude_walk()


def sparsify(
    model: PreTrainedModel,
    method: str,
    spec: SparsitySpec,
    targets: tuple[str, ...],
    batches: list[torch.Tensor] | None,
    blocksize: int = 128,
    damp: float = 0.01,
    propagate: bool = True,
    device: str = "cpu",
) -> dict[str, dict]:
    """Sparsify the target matrices of an in-memory `model` in place; returns the per-kind tally."""
    check_targets_present(model, get_adapter(model), targets)
    tally = _Tally()
    for _ in sparsity_walk(model, method, spec, targets, batches, tally, blocksize, damp, propagate, device):
        pass
    return tally.to_dict()


@releases_outputs
def slim(
    model: PreTrainedModel | str | Path,
    method: str = "wanda",
    sparsity: float | None = None,
    nm: tuple[int, int] | str | None = None,
    calib=None,
    targets: tuple[str, ...] | list[str] | str = ("experts",),
    tokenizer: PreTrainedTokenizerBase | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    blocksize: int = 128,
    damp: float = 0.01,
    propagate: bool = True,
    device: str = "cpu",
    streaming: Streaming = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    calibrate_all_experts: bool = False,
) -> SlimResult:
    """Zero weights inside the experts (and optionally shared experts / attention) of `model`.

    Args:
        model: an in-memory model, or a checkpoint directory / bundled name / Hub id.
        method: 'magnitude', 'wanda' or 'sparsegpt'.
        sparsity: fraction of each output row's weights to zero, in [0, 1) (default 0.5);
            or `nm`: (N, M) or 'N:M', keep at most N of every M consecutive input weights.
        calib: calibration data as for `compress` (CalibrationSpec, source string, or a
            list of [batch, seq] token tensors); default: the bundled corpus. Unused by magnitude.
        targets: any of 'experts' (routed, default), 'shared' (shared experts), 'attention'.
        blocksize, damp: SparseGPT's lazy-update block and relative Hessian damping.
        propagate: feed each layer the pruned previous layers' outputs (default, as in SparseGPT).
        out: save the result there (atomically; stock checkpoint unless the model needs remote code).
        calibrate_all_experts: route every calibration token to every routed expert while its statistics
            are gathered (`walk.all_experts`; the model's output and routing are unchanged), so no expert
            falls back to magnitude for want of tokens. Without it, the experts calibration never
            reached are listed in the summary ("unreached_experts") for the quality guard.
    """
    from ..engine.prepare import calibration_batches, prepare
    from ..evaluate.speed import peak_rss_bytes

    start = time.perf_counter()
    check_method(method)
    spec = make_spec(sparsity, nm)
    targets = check_targets(targets)
    if blocksize < 1:
        raise MoECompressError(f"blocksize must be a positive integer; got {blocksize}.")
    if not 0.0 <= damp:
        raise MoECompressError(f"damp must be >= 0 (a fraction of the mean Hessian diagonal); got {damp}.")
    model, tokenizer, adapter, weights = prepare(model, tokenizer, out, overwrite, device, streaming, dtype, trust_remote_code)
    if getattr(model.config, "quantization_config", None):
        raise MoECompressError("this model is quantised; sparsify the full-precision model, then quantise.")
    check_targets_present(model, adapter, targets)
    batches = None
    if method != "magnitude":
        batches = calibration_batches("bundled" if calib is None else calib, tokenizer, model.config)
    tally = _Tally()
    walk = sparsity_walk(model, method, spec, targets, batches, tally, blocksize, damp, propagate, device, weights, calibrate_all_experts)
    summary = {
        "stage": "slim",
        "method": method,
        "pattern": "n:m" if spec.nm else "unstructured",
        "sparsity": spec.describe(),
        "target_fraction": spec.target_fraction,
        "targets": list(targets),
        "propagate": propagate,
        **({"calibrate_all_experts": True} if calibrate_all_experts else {}),
        "sparsegpt": {"blocksize": blocksize, "damp": damp} if method == "sparsegpt" else None,
        "streamed": weights.streamed,
    }
    if not distributed.is_main():  # a helper rank of a distributed run: prune alongside, rank 0 writes
        for _ in walk:
            pass
        distributed.barrier()
        return SlimResult(None, {"rank": distributed.rank()}, None)
    groups = None
    if weights.streamed:
        groups = walk_groups(weights, adapter, walk)  # each layer is pruned and written in one visit
    else:
        for _ in walk:
            pass

    def finish() -> None:  # once every layer was pruned: before the summary file is written
        summary.update(reached=tally.to_dict(), seconds=round(time.perf_counter() - start, 3), peak_rss_bytes=peak_rss_bytes())
        if method != "magnitude":
            summary["unreached_experts"] = tally.unreached_names()

    if groups is None:
        finish()
    else:
        groups = _then(groups, finish)
    output_dir = save_with_summary(model, out, tokenizer, None, summary, overwrite, groups)
    distributed.barrier()
    return SlimResult(None if weights.streamed else model, summary, output_dir)


def _then(items: Iterable, action) -> Iterator:
    """Yield `items`, then run `action` (once they are all consumed)."""
    yield from items
    action()
