"""What a plan records of the model it was made for, and what a plan applied to a model is checked against."""

from __future__ import annotations

from transformers import PreTrainedModel

from ..arch.adapter import MoEAdapter
from ..source.residency import StreamedWeights, Weights
from ..walk.cache import content_fingerprint
from ..plan import ModelIdentity
from ..arch.structure import experts_per_layer


def weights_fingerprint(model: PreTrainedModel, weights: Weights | None = None) -> tuple[str, str]:
    """(fingerprint, kind): every byte of an in-memory model ("content"); the checkpoint's
    headers, sizes and mtimes for a streamed one, whose weights are not in memory ("checkpoint")."""
    if isinstance(weights, StreamedWeights):
        return weights.checkpoint.fingerprint(), "checkpoint"
    return content_fingerprint(model), "content"


def router_rows(model: PreTrainedModel, adapter: MoEAdapter) -> dict[int, int]:
    """Router rows per MoE layer: the expert dimension of every statistic observed there."""
    layers = adapter.decoder_layers(model)
    return {i: adapter.router_size(adapter.moe_block(layers[i])) for i in adapter.moe_layer_indices(model)}


def model_identity(model: PreTrainedModel, adapter: MoEAdapter, weights: Weights | None = None) -> ModelIdentity:
    """What a plan made for `model` records, and what a plan applied to it is checked against.

    Besides the run's own fingerprint (`weights_fingerprint`), weights that this run read
    unchanged from a checkpoint are also fingerprinted by its headers (cheap), so a plan made
    in memory can be checked by a streamed run and the other way round.
    """
    groups, per_token = adapter.routing_groups(model.config)
    fingerprint, kind = weights_fingerprint(model, weights)
    fingerprints = {kind: fingerprint}
    source = weights.checkpoint if weights is not None else None
    if source is not None and "checkpoint" not in fingerprints:
        fingerprints["checkpoint"] = source.fingerprint()
    return ModelIdentity(
        model_type=adapter.model_type,
        num_layers=len(adapter.decoder_layers(model)),
        experts_per_layer=experts_per_layer(model, adapter),
        top_k=adapter.top_k(model.config),
        hidden_size=int(model.config.get_text_config().hidden_size),
        routing_groups=groups,
        groups_per_token=per_token,
        fingerprints=fingerprints,
        dtype=str(model.dtype).removeprefix("torch."),
    )


