"""Each MoE layer's choices in fit's search, and the solver's table of them: bytes exact, cost by the proxies.

A choice is experts kept x bit width (with some kept experts raised to a wider width), the layer's
MoE sub-layer dropped (`DROPPED`), or its whole decoder block dropped (`BLOCK_DROPPED`). Bytes are
counted as the solver counts them, against the fixed part (`solver`'s module docstring): a kept or
dropped MoE weighs its routed experts and router (0 dropped); a dropped block weighs minus the rest
of the block -- attention, norms, shared experts, at the width the candidate gives the other decoder
weights -- which the fixed part holds, so the table's total is the written size whichever is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..stages.sizes import CheckpointSizes, LayerSizes, candidate_bytes
from .proxies import LayerProxy
from .solver import Option

#: The table offers widths per expert (`expert_choices`); False: every kept expert of a layer at one width.
PER_EXPERT_BITS = True


@dataclass(frozen=True)
class Choice:
    """A MoE layer's experts kept and their width; `wider`: kept experts at `to` bits instead, numbered as the quantize
    stage sees them -- their place among the kept experts in ascending id, the order the prune stage keeps them in.
    `block`: the whole decoder block dropped (keep 0 without it: the MoE sub-layer alone)."""

    keep: int
    bits: int
    wider: tuple[int, ...] = ()
    to: int = 16
    block: bool = False

    @property
    def dropped(self) -> bool:
        """No routed expert left: the MoE sub-layer, or the whole block, dropped."""
        return self.keep == 0

    @property
    def label(self) -> str:
        if self.dropped:
            return "block dropped" if self.block else "dropped"
        return f"{self.keep}x{self.bits}b" + (f"+{len(self.wider)}x{self.to}b" if self.wider else "")

    def widths(self) -> dict[int, int]:
        """Each kept expert's width, by its number after the prune stage."""
        return {e: self.to if e in self.wider else self.bits for e in range(self.keep)}

    def entry(self) -> dict:
        """The allocation's entry in the report: experts kept, bits, the experts raised where some are, a dropped block."""
        raised = {"raised": f"{len(self.wider)} at {self.to} bits: {', '.join(map(str, self.wider))}"} if self.wider else {}
        return {"keep": self.keep, "bits": self.bits, **raised, **({"dropped": "whole block"} if self.block else {})}


#: A layer's routed MoE dropped (`Drop(layers=...)`): no expert kept, no bits.
DROPPED = Choice(0, 0)
#: A layer's whole decoder block dropped (`Drop(unit="block", layers=...)`): attention, shared experts and all.
BLOCK_DROPPED = Choice(0, 0, block=True)
#: The choices that leave a layer nothing routing.
NOT_ROUTING = (DROPPED.label, BLOCK_DROPPED.label)


def droppable(sizes: CheckpointSizes, layer: int) -> bool:
    """Whether layer drop removes exactly `layer`'s routed experts and router: its MoE sub-layer is a module of its own
    holding nothing else (shared experts would go with it, which the proxies do not price), and another MoE layer is left."""
    return sizes.moe_droppable and sizes.layers[layer].rest_bytes == 0 and len(sizes.layers) > 1


def block_droppable(sizes: CheckpointSizes, proxy: LayerProxy | None) -> bool:
    """Whether the table offers `layer`'s whole block dropped: another MoE layer is left to route, and (with proxies)
    the block's residual energy was observed to price it."""
    return len(sizes.layers) > 1 and (proxy is None or proxy.block is not None)


def block_rest(sizes: CheckpointSizes, layer: int, other_bits: int) -> int:
    """Decoder layer `layer`'s bytes besides its routed experts and router (attention, norms, shared experts), with the
    weights scope "all" packs among them at `other_bits`: what dropping the block frees beyond its MoE."""
    moe = sizes.layers[layer]
    packed = sizes.others.get(layer)
    return sizes.blocks[layer] - moe.experts * moe.expert_bytes[16] - moe.router_bytes - (packed[16] - packed[other_bits] if packed else 0)


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
    (`expert_choices`: after the whole-layer ones, so those win every tie); last the drops, which leave the layer
    nothing routing: `BLOCK_DROPPED` where `block_droppable`, then `DROPPED` where the layer is `droppable`."""
    def of(layer: int) -> list[Choice]:
        counts = sorted(floors[layer], reverse=True)
        raised = expert_choices(proxies[layer], counts, bits) if proxies and PER_EXPERT_BITS else []
        drops = [BLOCK_DROPPED] if block_droppable(sizes, proxies[layer] if proxies else None) else []
        return [Choice(k, b) for b in bits for k in counts] + raised + drops + ([DROPPED] if droppable(sizes, layer) else [])

    return {layer: of(layer) for layer in sorted(sizes.layers)}


def choice_bytes(layer: LayerSizes, choice: Choice, novices: bool = False) -> int:
    """A choice's bytes of the layer's routed experts and router (none left when dropped); `novices`: a substituting
    method's (MoNE: the removed experts' router rows, vectors and slot map stay, `stages.sizes.candidate_bytes`)."""
    if choice.dropped:
        return 0
    widths = {choice.bits: choice.keep - len(choice.wider), choice.to: len(choice.wider)} if choice.wider else choice.bits
    return candidate_bytes(layer, choice.keep, widths, novices)


def _costs(proxy: LayerProxy, choices: list[Choice]) -> list[float]:
    """Each choice's proxy cost: its (kept count, width)'s, computed once per pair, plus what its raised experts change;
    a dropped block's, `LayerProxy.block_cost`."""
    whole: dict[tuple[int, int], float] = {}
    for c in choices:
        if not c.block and (c.keep, c.bits) not in whole:
            whole[c.keep, c.bits] = proxy.cost(c.keep, c.bits)
    return [proxy.block_cost() if c.block else whole[c.keep, c.bits] + proxy.raised(c.keep, c.bits, c.wider, c.to) for c in choices]


def costs(choices: dict[int, list[Choice]], proxies: dict[int, LayerProxy] | None) -> dict[int, list[float]]:
    """Per layer, each choice's proxy cost (0 without proxies: a dry run)."""
    return {layer: _costs(proxies[layer], options) if proxies else [0.0] * len(options) for layer, options in choices.items()}


def rows(sizes: CheckpointSizes, choices: dict[int, list[Choice]], priced: dict[int, list[float]], novices: bool = False,
         other_bits: int = 16) -> list[list[Option]]:
    """The solver's table from each choice's cost (`costs`): per layer, per choice, its bytes against the fixed part at
    `other_bits` (`choice_bytes`; minus the block's rest, `block_rest`, for a dropped block)."""
    def weight(layer: int, c: Choice) -> int:
        return -block_rest(sizes, layer, other_bits) if c.block else choice_bytes(sizes.layers[layer], c, novices)

    return [[Option(weight(layer, c), cost, c.label) for c, cost in zip(options, priced[layer])] for layer, options in choices.items()]


def table(sizes: CheckpointSizes, choices: dict[int, list[Choice]], proxies: dict[int, LayerProxy] | None,
          novices: bool = False, other_bits: int = 16) -> list[list[Option]]:
    """The solver's table: per layer, per choice, its bytes (`rows`) and proxy cost (0 without proxies: a dry run)."""
    return rows(sizes, choices, costs(choices, proxies), novices, other_bits)
