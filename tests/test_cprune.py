"""C-Prune: clustering finds duplicated experts and prunes duplicates before unique ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import token_batches
from moe_compress import MoECompressError, compress, get_adapter
from moe_compress.methods.cprune import cluster_affinity, representatives
from tiny_models import tiny_model


def test_clustering_and_representatives_on_a_hand_made_affinity():
    # Experts 0/1 nearly identical, 2/3 nearly identical, 4 alone.
    affinity = np.array(
        [
            [1.0, 0.99, 0.1, 0.1, 0.0],
            [0.99, 1.0, 0.1, 0.2, 0.0],
            [0.1, 0.1, 1.0, 0.95, 0.1],
            [0.1, 0.2, 0.95, 1.0, 0.1],
            [0.0, 0.0, 0.1, 0.1, 1.0],
        ]
    )
    labels = cluster_affinity(affinity, 3)
    assert labels[0] == labels[1] and labels[2] == labels[3] and len(set(labels)) == 3
    # Nearest to the centre: in {0, 1}, 1 has the higher mean affinity (0.99 + 1 + .1 + .2 + 0 terms
    # are only over members: (1 + .99) / 2 for both, so the tie keeps the lower index).
    kept = representatives(affinity, labels, 3)
    assert sorted(kept) == [0, 2, 4]
    assert len(representatives(affinity, cluster_affinity(affinity, 2), 4)) == 4


def _model_with_duplicates():
    """Mixtral where experts 4..7 of every layer copy experts 0..3 with tiny noise."""
    model = tiny_model("mixtral", num_layers=2)
    adapter = get_adapter(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for index in adapter.moe_layer_indices(model):
            experts = adapter.experts(adapter.moe_block(adapter.decoder_layers(model)[index]))
            for tensor in (experts.gate_up_proj, experts.down_proj):
                tensor[4:] = tensor[:4] + 1e-4 * torch.randn(tensor[4:].shape, generator=generator)
    return model


@pytest.mark.parametrize("linkage_method", ["average", "complete"])
def test_duplicates_share_a_cluster_and_only_one_of_each_pair_survives(linkage_method):
    model = _model_with_duplicates()
    result = compress(
        model, method="cprune", ratio=0.5, budget="layer", calib=token_batches(count=4), cache_dir=False,
        # twins share their activation maxima, so the super-expert guard would keep a whole pair
        options={"linkage_method": linkage_method, "probe_tokens": 16, "protect_super_experts": False},
    )
    for layer in result.plan.layers:
        assert all(layer.clusters[e] == layer.clusters[e + 4] for e in range(4)), layer.clusters
        assert len(set(layer.clusters)) == 4
        assert sorted(e % 4 for e in layer.keep) == [0, 1, 2, 3], f"one of each duplicate pair must stay: {layer.keep}"
        # Scores are votes: 4 batches x 4 representatives, and each pair shares its 4 votes.
        assert sum(layer.scores) == 16.0
        assert all(layer.scores[e] + layer.scores[e + 4] == 4.0 for e in range(4)), layer.scores


def _layer_zero_redundant():
    """Layer 0 has duplicated experts, layer 1 does not."""
    model = _model_with_duplicates()
    adapter = get_adapter(model)
    with torch.no_grad():  # make layer 1's experts distinct again
        experts = adapter.experts(adapter.moe_block(model.model.layers[1]))
        experts.gate_up_proj[4:].normal_(0, 0.2)
        experts.down_proj[4:].normal_(0, 0.2)
    return model


def test_global_stage_prunes_duplicates_before_unique_experts():
    """Stage 2 alone (stage1_share=0)."""
    result = compress(
        _layer_zero_redundant(), method="cprune", ratio=0.25, budget="global", calib=token_batches(count=4), cache_dir=False,
        options={"stage1_share": 0.0, "probe_tokens": 16},
    )
    counts = result.plan.kept_counts()
    assert sum(counts.values()) == 12
    assert counts[0] < counts[1], f"the layer with duplicates must lose more: {counts}"
    assert counts[0] >= 4 and result.plan.meta["max_layer_loss"] == 0.5  # default cap: twice the ratio
    assert "global_clusters" in result.plan.meta


def test_global_stage_respects_the_per_layer_cap():
    capped = compress(
        _layer_zero_redundant(), method="cprune", ratio=0.25, budget="global", calib=token_batches(count=4), cache_dir=False,
        options={"stage1_share": 0.0, "probe_tokens": 16, "max_layer_loss": 0.25},
    )
    assert capped.plan.kept_counts() == {0: 6, 1: 6}, "no layer may lose more than a quarter of its experts"


def test_group_limited_routing_is_refused_clearly():
    with pytest.raises(MoECompressError, match="group-limited"):
        compress(tiny_model("deepseek_v3"), method="cprune", ratio=0.5, calib=token_batches(), cache_dir=False)


def test_unknown_option_is_refused():
    with pytest.raises(MoECompressError, match="no option"):
        compress(tiny_model("mixtral"), method="cprune", ratio=0.5, calib=token_batches(), cache_dir=False, options={"k": 3})
