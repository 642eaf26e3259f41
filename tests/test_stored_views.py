"""A pruned layer's kept experts written as views of the buffers they were read into (`sink.stored_views`)."""

from __future__ import annotations

import torch
from transformers.core_model_loading import revert_weight_conversion

from moe_compress.sink.stored_views import KeptExperts, PrunedLayer, reverted
from tiny_models import tiny_model


def _layer(model, keep):
    state = {k: v for k, v in model.state_dict().items() if k.startswith("model.layers.0.")}
    gate_up, down = state["model.layers.0.mlp.experts.gate_up_proj"], state["model.layers.0.mlp.experts.down_proj"]
    rows = gate_up.shape[1] // 2
    experts = {"model.layers.0.mlp.experts.gate_up_proj": KeptExperts(gate_up, keep, ((0, rows), (rows, rows))),
               "model.layers.0.mlp.experts.down_proj": KeptExperts(down, keep, ((0, down.shape[1]),))}
    cut = {**state, **{name: kept.source[list(keep)].contiguous() for name, kept in experts.items()}}
    return PrunedLayer(state, experts), revert_weight_conversion(model, cut)


def test_kept_experts_are_written_as_views_with_transformers_names_order_and_bytes():
    model = tiny_model("qwen3_moe")
    layer, expected = _layer(model, (1, 3, 4))
    written = reverted(model, layer, set())
    assert list(written) == list(expected)
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    storages = {kept.source.untyped_storage().data_ptr() for kept in layer.experts.values()}
    experts = [k for k in written if ".experts." in k]
    assert len(experts) == 3 * 3 and all(written[k].untyped_storage().data_ptr() in storages for k in experts), "views, not copies"
    assert all(written[k].is_contiguous() for k in experts)


def test_parts_that_do_not_match_the_conversion_fall_back_to_cutting():
    """Parts claiming one stored tensor per expert where the conversion splits two: the views would have the wrong
    shapes, so the layer is cut and converted -- the same bytes, through copies."""
    model = tiny_model("qwen3_moe")
    layer, expected = _layer(model, (0, 2))
    name = "model.layers.0.mlp.experts.gate_up_proj"
    whole = layer.experts[name]
    layer.experts[name] = KeptExperts(whole.source, whole.keep, ((0, whole.source.shape[1]),))
    written = reverted(model, layer, set())
    assert list(written) == list(expected) and all(torch.equal(written[k], expected[k]) for k in expected)
    assert all(written[k].untyped_storage().data_ptr() != whole.source.untyped_storage().data_ptr() for k in written)
