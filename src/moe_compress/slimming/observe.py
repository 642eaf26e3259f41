"""Which weight matrices to sparsify, and the input statistics of each, one layer at a time.

A routed expert only ever sees the tokens routed to it, so its statistics come from those
tokens alone: the experts module's forward pre-hook receives (hidden_states, top_k_index,
top_k_weights) and splits the tokens by expert. The two matrices of a gated expert see
different inputs -- gate_up_proj the MoE input x, down_proj act(x W_g^T) * (x W_u^T) of that
expert -- so both are collected. Attention and shared-expert projections are plain `Linear`s
that see every token; a forward pre-hook on each collects their inputs.

The router is never touched and the statistics never buffer tokens: each matrix keeps the
running sum of squared inputs per column (Wanda) and, if asked, X^T X (SparseGPT).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..arch.adapter import MoEAdapter
from ..errors import MoECompressError
from ..source.residency import Weights
from ..walk.all_experts import route_to_every_expert
from ..walk.experts_forward import ExpertPass, capturing, is_standard_experts
from ..walk.observer import LayerWalk

TARGETS: tuple[str, ...] = ("experts", "shared", "attention")
Need = Literal["norms", "hessian"]


@dataclass
class WeightMatrix:
    """One matrix W [out, in] (y = x W^T): a Linear's weight, or one expert's slice of a fused tensor.

    Fused expert tensors are [E, out, in], or [E, in, out] where the family stores them
    transposed (gpt_oss); `read`/`write` hide that, and `write` changes the weights in place
    so the model keeps its stock parameters, shapes and dtypes.
    """

    name: str
    kind: str
    tensor: torch.Tensor
    expert: int | None = None
    transposed: bool = False

    def _view(self) -> torch.Tensor:
        view = self.tensor[self.expert] if self.expert is not None else self.tensor
        return view.T if self.transposed else view

    def read(self) -> torch.Tensor:
        return self._view().detach()

    @torch.no_grad()
    def write(self, value: torch.Tensor) -> None:
        view = self._view()
        view.copy_(value.to(dtype=view.dtype, device=view.device))


class InputStats:
    """Running statistics of the inputs of one matrix: tokens, sum of x_j^2, optionally X^T X.

    Squared norms are summed in float64 (cheap: one vector). X^T X is kept in float32, as
    SparseGPT does: at [in, in] per expert per matrix it dominates memory on large models.
    """

    def __init__(self, columns: int, need: Need, device: torch.device):
        self.tokens = 0
        self.sq_sum = torch.zeros(columns, dtype=torch.float64, device=device)
        self.xtx = torch.zeros(columns, columns, dtype=torch.float32, device=device) if need == "hessian" else None

    def combine_ranks(self) -> None:
        """Sum these statistics over the ranks of a distributed run, so every rank prunes alike."""
        from ..distributed import active, all_reduce_sum_

        if active():
            self.tokens = int(all_reduce_sum_(torch.tensor([self.tokens], dtype=torch.float64, device=self.sq_sum.device)).item())
            all_reduce_sum_(self.sq_sum)
            if self.xtx is not None:
                all_reduce_sum_(self.xtx)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.sq_sum.shape[0]).float()
        if not x.shape[0]:
            return
        self.tokens += x.shape[0]
        self.sq_sum += x.pow(2).sum(dim=0).double()  # float32 within a batch, float64 across batches
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)


def expert_hidden(experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """The input of expert `expert`'s down projection for tokens x [N, H]: act(gate) * up.

    Mirrors the first half of `arch.expert_math.expert_forward` (same layout flags, the
    family's own `_apply_gate`), so gpt_oss's clamped, interleaved gate is handled too.
    """
    transposed = getattr(experts, "is_transposed", False)
    has_bias = getattr(experts, "has_bias", False)
    name = "gate_up_proj" if getattr(experts, "has_gate", True) else "up_proj"
    weight = getattr(experts, name)[expert]
    out = x @ weight if transposed else x @ weight.T
    if has_bias:
        out = out + getattr(experts, f"{name}_bias")[expert]
    return experts._apply_gate(out) if name == "gate_up_proj" else experts.act_fn(out)


def _routing_arguments(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states, top-k expert index) from an experts forward call, by position or keyword."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[n] for n in names[len(args) :] if n in kwargs]
    if len(values) < 2:  # gpt_oss names them router_indices / routing_weights
        values += [v for k, v in kwargs.items() if k not in names]
    return values[0], values[1]


@dataclass
class LayerCollector:
    """The matrices of one decoder layer chosen by `targets`, and their input statistics."""

    index: int
    matrices: list[WeightMatrix] = field(default_factory=list)
    stats: dict[str, InputStats] = field(default_factory=dict)
    _hooks: list[Callable[[], object]] = field(default_factory=list)

    @contextmanager
    def collecting(self) -> Iterator[None]:
        handles = [install() for install in self._hooks]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()  # type: ignore[attr-defined]


class _ContextHandle:
    """A context manager entered now and exited by `remove()`, like a hook handle."""

    def __init__(self, context) -> None:
        self.context = context
        context.__enter__()

    def remove(self) -> None:
        self.context.__exit__(None, None, None)


def _linears(module: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            yield name, sub


def layer_collector(
    adapter: MoEAdapter, layer: nn.Module, index: int, targets: tuple[str, ...], need: Need | None, all_experts: bool = False
) -> LayerCollector:
    """The target matrices of decoder layer `index` and (if `need`) hooks that fill their statistics.

    `all_experts`: every routed expert's statistics see every token of the layer, not only its routed
    ones (`walk.all_experts`: the layer's output stays its own), so no expert is left without data.

    Shared-expert attributes that are a bare `Linear` (Qwen2-MoE's `shared_expert_gate`) are a
    gate, like the router, and stay untouched; so does every router.
    """
    collector = LayerCollector(index)
    device = next(layer.parameters()).device
    prefix = f"layers.{index}"

    def add_linear(kind: str, name: str, linear: nn.Linear) -> None:
        matrix = WeightMatrix(f"{prefix}.{name}.weight", kind, linear.weight)
        collector.matrices.append(matrix)
        if need is not None:
            stats = collector.stats[matrix.name] = InputStats(linear.in_features, need, device)
            collector._hooks.append(lambda: linear.register_forward_pre_hook(lambda _m, args: stats.add(args[0])))

    if "attention" in targets:
        attention = getattr(layer, "self_attn", None)
        for name, linear in _linears(attention) if attention is not None else ():
            add_linear("attention", f"self_attn.{name}", linear)
    block = adapter.moe_block(layer)
    if block is None:
        return collector
    if "shared" in targets:
        for attr in adapter.shared_expert_attrs:
            module = getattr(block, attr, None)
            if module is None or isinstance(module, nn.Linear):
                continue
            for name, linear in _linears(module):
                add_linear("shared", f"{adapter.moe_attr}.{attr}.{name}", linear)
    if "experts" in targets:
        experts = adapter.experts(block)
        transposed = bool(getattr(experts, "is_transposed", False))
        first = "gate_up_proj" if hasattr(experts, "gate_up_proj") else "up_proj"
        base = f"{prefix}.{adapter.moe_attr}.{adapter.experts_attr}"
        count = getattr(experts, first).shape[0]
        pairs = []
        for e in range(count):
            up = WeightMatrix(f"{base}.{first}[{e}]", "experts", getattr(experts, first), e, transposed)
            down = WeightMatrix(f"{base}.down_proj[{e}]", "experts", experts.down_proj, e, transposed)
            collector.matrices += [up, down]
            if need is not None:
                up_stats = collector.stats[up.name] = InputStats(up.read().shape[1], need, device)
                down_stats = collector.stats[down.name] = InputStats(down.read().shape[1], need, device)
                pairs.append((up_stats, down_stats))

        def on_pass(captured: ExpertPass) -> None:
            """Per expert, the tokens routed to it and its down-projection inputs: segments of the pass."""
            tokens, start = captured.tokens, 0
            for e, count in enumerate(captured.counts.tolist()):
                if count:
                    pairs[e][0].add(tokens[start : start + count])
                    pairs[e][1].add(captured.hidden[start : start + count])
                start += count

        def on_experts(module: nn.Module, args: tuple, kwargs: dict) -> None:
            """Other experts modules (our novice classes): route and recompute the down inputs here."""
            x, top_index = _routing_arguments(args, kwargs)
            x = x.reshape(-1, x.shape[-1])
            top_index = top_index.reshape(x.shape[0], -1).long()
            slot = getattr(module, "expert_slot", None)
            if slot is not None:  # router rows -> kept experts; novices (< 0) have no weights
                top_index = slot[top_index]
            for e, (up_stats, down_stats) in enumerate(pairs):
                rows = (top_index == e).any(dim=1)
                if bool(rows.any()):
                    tokens = x[rows]
                    up_stats.add(tokens)
                    down_stats.add(expert_hidden(module, e, tokens))

        if need is not None and all_experts:  # first: the hooks below then read the dense routing
            collector._hooks.append(lambda: route_to_every_expert(experts))
        if need is not None and is_standard_experts(experts):  # the forward hands over what it computes
            collector._hooks.append(lambda: _ContextHandle(capturing(experts, on_pass)))
        elif need is not None:
            collector._hooks.append(lambda: experts.register_forward_pre_hook(on_experts, with_kwargs=True))
    return collector


@torch.no_grad()
def prune_layer_by_layer(
    model: nn.Module,
    adapter: MoEAdapter,
    batches: list[torch.Tensor],
    make_collector: Callable[[int, nn.Module], LayerCollector | None],
    prune: Callable[[LayerCollector], None],
    device: str | torch.device = "cpu",
    propagate: bool = True,
    description: str = "slimming layers",
    weights: Weights | None = None,
) -> LayerWalk:
    """Calibrate, prune, and move on: one decoder layer at a time (iterate the returned walk).

    `walk.observer.run_sequential` (captured layer inputs, one layer on the device at a
    time), pruning each layer once it has been observed; its outputs are then recomputed
    (`propagate=True`), so layer l+1 collects its
    statistics from what the *pruned* model feeds it, as the SparseGPT paper does -- each
    layer then compensates for the error of the layers before it. `propagate=False` reuses the
    observation pass's outputs instead (statistics of the unpruned model; one pass per layer).
    Within a layer, all target matrices (attention, shared and routed experts) take their
    statistics from the same pass over the unpruned layer, then are pruned together.
    """
    collectors: dict[int, LayerCollector] = {}

    def collect(index: int, layer: nn.Module):
        collector = make_collector(index, layer)
        if collector is None or not collector.matrices:
            return None
        collectors[index] = collector
        return collector.collecting()

    def prune_collected(index: int, _layer: nn.Module) -> bool:
        collector = collectors.pop(index, None)
        if collector is None:
            return False
        prune(collector)
        return propagate

    from ..distributed import check_shareable, shard

    check_shareable(len(batches))
    return LayerWalk(model, adapter, shard(batches), collect, device, description, after_layer=prune_collected, weights=weights)


def check_targets(targets: tuple[str, ...] | list[str] | str) -> tuple[str, ...]:
    """Validated, de-duplicated targets ('experts', 'shared', 'attention'); a string may be comma-separated."""
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    chosen = tuple(dict.fromkeys(targets))
    unknown = [t for t in chosen if t not in TARGETS]
    if not chosen or unknown:
        raise MoECompressError(f"targets must be a non-empty selection of {', '.join(TARGETS)}; got {', '.join(map(str, targets)) or 'nothing'}.")
    return chosen
