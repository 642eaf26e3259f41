"""What a model will weigh after a sequence of stages, predicted before any of them runs.

A `Footprint` starts from a checkpoint's sizes (`stages.sizes`: config and shard headers) and
each stage's `predict` returns the next one, so a dry run or a budget search can rank whole
compositions ("prune 25 %, then 4 bits") at the cost of arithmetic. It tracks, per MoE layer,
the routed experts kept and their bit width (or, for mixed precision, how many of them take
each width: every expert of a layer has the same shape, so that is all the bytes depend on),
the width of the other decoder weights (quantize's scope "all"), and the decoder blocks removed; from
these it gives the saved bytes, the parameters and the parameters active per token.

Exact where the stage's outcome does not depend on calibration: a layer budget's counts, bit
widths, a drop of layers of equal size. Where it does (which layers a global budget thins,
which of several unequal layers a drop removes), the prediction takes the layers in order and
says it is an estimate (`exact=False`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..errors import MoECompressError
from .sizes import CheckpointSizes, candidate_bytes, checkpoint_sizes

if TYPE_CHECKING:
    from .base import Stage


@dataclass(frozen=True)
class Footprint:
    sizes: CheckpointSizes
    keep: dict[int, int]  # MoE layer -> routed experts it keeps (layers whose MoE sub-layer is gone are absent)
    bits: dict[int, int | dict[int, int]]  # MoE layer -> bit width of its routed experts (16: as stored), or {width: experts at it}
    dropped_blocks: frozenset[int] = field(default_factory=frozenset)
    exact: bool = True
    other_bits: int = 16  # the decoder weights besides the routed experts (`CheckpointSizes.others`): 16 as stored
    novices: frozenset[int] = field(default_factory=frozenset)  # MoE layers whose removed experts became novices (MoNE)

    @classmethod
    def of(cls, sizes: CheckpointSizes) -> Footprint:
        return cls(sizes, {i: layer.experts for i, layer in sizes.layers.items()}, {i: 16 for i in sizes.layers})

    @property
    def bytes(self) -> int:
        """Saved weight bytes: the fixed part, less removed blocks' fixed bytes, plus every remaining MoE layer's candidate."""
        moe = sum(self.moe_layer_bytes(i) for i in self.keep)
        packed = sum(sizes[16] - sizes[self.other_bits] for i, sizes in self.sizes.others.items() if i not in self.dropped_blocks)
        return self.sizes.fixed - sum(self._block_rest(i) for i in self.dropped_blocks) - sum(layer.rest_bytes for layer in self._dropped_moe()) + moe - packed

    def _dropped_moe(self) -> list:
        """The MoE layers whose sub-layer alone was dropped (their shared experts went with it)."""
        return [layer for i, layer in self.sizes.layers.items() if i not in self.keep and i not in self.dropped_blocks]

    @property
    def params(self) -> int:
        """Parameters (tied weights once): the fixed ones, less removed blocks' rest, plus every remaining MoE layer's."""
        return self._params(active=False)

    @property
    def active_params(self) -> int:
        """Parameters a token uses: the routed experts of its top-k only (all that are kept in a condensed layer)."""
        return self._params(active=True)

    def _params(self, active: bool) -> int:
        layers = self.sizes.layers
        moe = sum(layers[i].params(keep, min(layers[i].top_k, keep) if active and layers[i].top_k else keep) for i, keep in self.keep.items())
        dropped = sum(self._block_rest_params(i) for i in self.dropped_blocks) + sum(layer.rest_params for layer in self._dropped_moe())
        return self.sizes.fixed_params - dropped + moe

    def _block_rest_params(self, block: int) -> int:
        layer = self.sizes.layers.get(block)
        return self.sizes.block_params[block] - (layer.params(layer.experts, layer.experts) if layer else 0)

    def _block_rest(self, block: int) -> int:
        """A block's bytes besides its routed experts and router (attention, norms, shared experts)."""
        layer = self.sizes.layers.get(block)
        return self.sizes.blocks[block] - (layer.experts * layer.expert_bytes[16] + layer.router_bytes if layer else 0)

    def moe_layer_bytes(self, layer: int) -> int:
        return candidate_bytes(self.sizes.layers[layer], self.keep[layer], self.bits[layer], layer in self.novices)

    def with_keep(self, keep: dict[int, int], exact: bool = True, novices: bool = False) -> Footprint:
        """Each MoE layer keeping `keep` experts; `novices`: the removed ones become novices (a substituting method's prune)."""
        substituted = frozenset(i for i, k in keep.items() if k < self.sizes.layers[i].experts) if novices else frozenset()
        return replace(self, keep=keep, exact=self.exact and exact, novices=self.novices | substituted)

    def with_bits(self, bits: int) -> Footprint:
        return replace(self, bits={i: bits for i in self.bits})

    def with_other_bits(self, bits: int) -> Footprint:
        """The other decoder weights at `bits` (exact where the sizes know them: `CheckpointSizes.others`)."""
        return replace(self, other_bits=bits) if self.sizes.others else replace(self, exact=False)

    def with_expert_widths(self, widths: dict[int, tuple[int, ...]]) -> Footprint:
        """Each kept MoE layer's experts at their own widths (`slimming.expert_bits.resolve_expert_bits`)."""
        from ..slimming.expert_bits import bits_histogram

        mixed = {i: w[0] if len(set(w)) == 1 else bits_histogram(w) for i, w in widths.items() if w}
        return replace(self, bits=self.bits | mixed)

    def without_moe(self, count: int) -> Footprint:
        """`count` MoE sub-layers removed: the last ones, an estimate unless every candidate weighs the same."""
        sizes = {self.moe_layer_bytes(i) + self.sizes.layers[i].rest_bytes for i in self.keep}
        return self.without_moe_layers(sorted(self.keep)[-count:] if count else [], exact=len(sizes) <= 1)

    def without_moe_layers(self, layers: Sequence[int], exact: bool = True) -> Footprint:
        """The MoE sub-layers of `layers` removed (their shared experts with them)."""
        return replace(self, keep={i: k for i, k in self.keep.items() if i not in layers}, exact=self.exact and exact)

    def without_block_layers(self, blocks: Sequence[int]) -> Footprint:
        """The decoder blocks `blocks` removed (the input's indices, as the footprint's own are: see `original_layer`)."""
        named = [self.original_layer(i) for i in blocks]
        return replace(self, keep={i: k for i, k in self.keep.items() if i not in named}, dropped_blocks=self.dropped_blocks | frozenset(named))

    def original_layer(self, index: int) -> int:
        """The original decoder index of the model's layer `index` once `dropped_blocks` are gone (the footprint keys by the original's)."""
        alive = [i for i in sorted(self.sizes.blocks) if i not in self.dropped_blocks]
        if not 0 <= index < len(alive):
            raise MoECompressError(f"layer {index} is not among the {len(alive)} decoder layers left (0-{len(alive) - 1}).")
        return alive[index]

    def without_blocks(self, count: int) -> Footprint:
        """`count` decoder blocks removed (their MoE layers with them): the last ones, an estimate unless all weigh the same."""
        alive = [i for i in sorted(self.sizes.blocks) if i not in self.dropped_blocks]
        chosen = alive[-count:] if count else []
        weights = {self._block_rest(i) + (self.moe_layer_bytes(i) if i in self.keep else 0) for i in alive}
        keep = {i: k for i, k in self.keep.items() if i not in chosen}
        return replace(self, keep=keep, dropped_blocks=self.dropped_blocks | frozenset(chosen), exact=self.exact and len(weights) <= 1)


def footprints(model: str, stages: Sequence[Stage], trust_remote_code: bool = False) -> list[Footprint] | None:
    """The model's footprint before the stages and after each (what a dry run prints), from its
    config and shard headers; None where those cannot tell (a Hub id, experts of several shapes)."""
    try:
        chain = [Footprint.of(checkpoint_sizes(model, trust_remote_code=trust_remote_code))]
    except MoECompressError:
        return None
    for stage in stages:
        chain.append(stage.predict(chain[-1]))
    return chain
