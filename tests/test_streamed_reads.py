"""How a streamed layer is read: each key once into its place (source.direct), into buffers reused across layers
(source.buffers), and the stem's embedding mapped rather than read -- always the bytes transformers' loader gives."""

from __future__ import annotations

import pytest
import torch

from helpers import token_batches
from moe_compress.errors import MoECompressError
from moe_compress.source.load import load_streamed
from moe_compress import get_adapter
from moe_compress.walk.observer import LayerWalk, embedding_lookups
from tiny_models import tiny_model

FUSED = ("gate_up_proj", "down_proj")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    for model_type in ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "granitemoe"):
        tiny_model(model_type).save_pretrained(root / model_type)
    return root


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "granitemoe"])
def test_every_layer_reads_as_transformers_loader_converts_it(checkpoints, model_type):
    weights, _ = load_streamed(checkpoints / model_type)
    names = [name for name in weights.targets if ".layers." in name]
    weights.materialize(names)
    direct = {name: weights.model.state_dict()[name].clone() for name in names}
    weights.release(names)
    weights._load_converted(names, "cpu")  # transformers' loader, as before source.direct
    loaded = weights.model.state_dict()
    assert all(torch.equal(direct[name], loaded[name]) and direct[name].dtype == loaded[name].dtype for name in names)
    fused = [name for name in names if name.endswith(FUSED)]
    assert fused and all(weights._direct_plan(name, loaded[name]) is not None for name in fused), "the fused experts are read directly"


def test_a_released_layer_s_buffers_take_the_next_layer_unless_still_referred_to(checkpoints):
    weights, _ = load_streamed(checkpoints / "mixtral")  # every layer an MoE layer of the same shapes
    layers = weights.model.model.layers
    with weights.loaded(layers[0]):
        first = layers[0].mlp.experts.gate_up_proj.data_ptr()
        kept = layers[0].mlp.experts.down_proj[1]  # a view a stage holds on to past the layer's visit
        values = kept.clone()
    with weights.loaded(layers[1]):
        assert layers[1].mlp.experts.gate_up_proj.data_ptr() == first  # reused: no new pages to fault
        assert layers[1].mlp.experts.down_proj.data_ptr() != kept.data_ptr()  # never overwritten under a holder
        assert all(p.data_ptr() % 64 == 0 for p in layers[1].parameters())  # source.alignment
    assert torch.equal(kept, values)
    with weights.loaded(layers[2]):
        assert layers[2].mlp.experts.down_proj.data_ptr() != kept.data_ptr()


def test_the_stem_maps_the_input_embedding_and_checks_the_rows_it_looks_up(checkpoints, tmp_path):
    model = tiny_model("qwen3_moe")
    batches = token_batches(count=1)
    used = int(batches[0][0, 0])
    unused = next(row for row in range(model.config.vocab_size) if row not in set(batches[0].flatten().tolist()))
    with torch.no_grad():
        model.model.embed_tokens.weight[unused, 0] = float("nan")
    model.save_pretrained(tmp_path / "unused")
    row = model.model.embed_tokens.weight[used].clone()
    with torch.no_grad():
        model.model.embed_tokens.weight[used, 0] = float("nan")
    model.save_pretrained(tmp_path / "used")

    weights, _ = load_streamed(tmp_path / "unused")
    lookups = embedding_lookups(weights.model, batches)
    assert list(lookups) == ["model.embed_tokens.weight"] and torch.equal(lookups["model.embed_tokens.weight"], batches[0].unique())
    with weights.loaded_names(["model.embed_tokens.weight"], lookups=lookups):
        table = weights.model.model.embed_tokens.weight
        assert table.untyped_storage().nbytes() == (tmp_path / "unused" / "model.safetensors").stat().st_size  # the shard's mapping
        assert torch.equal(table[used], row)
    weights, _ = load_streamed(tmp_path / "used")
    with pytest.raises(MoECompressError, match=r"checkpoint tensor model\.embed_tokens\.weight contains 1 NaN"):
        weights.materialize(["model.embed_tokens.weight"], lookups=embedding_lookups(weights.model, batches))


def test_a_walk_frees_the_buffers_kept_for_a_next_layer_when_it_ends(checkpoints):
    weights, _ = load_streamed(checkpoints / "mixtral")
    walk = LayerWalk(weights.model, get_adapter(weights.model), token_batches(count=1), weights=weights)
    for _ in walk:
        pass
    assert weights._buffers._kept == []  # the last layer's buffers are not held while later stages run
