"""C-Prune: the reference mode's clustering and keep rule on hand-made cases; the cosine variant
finds duplicated experts and prunes duplicates before unique ones."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from helpers import token_batches
from moe_compress import MoECompressError, compress, get_adapter
from moe_compress.engine.statistics import collect_statistics
from moe_compress.methods import PlanRequest, get_method
from moe_compress.methods.cprune import cluster_votes, keep_coefficient, ward_clusters
from moe_compress.runtime import expert_forward
from moe_compress.methods.cprune_cosine import cluster_affinity, representatives
from tiny_models import tiny_model

#: Hand-made statistics carry no activation maxima: the super-expert guard is switched off.
NO_GUARD = {"protect_super_experts": False}


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
        model, method="cprune-cosine", ratio=0.5, budget="layer", calib=token_batches(count=4), cache_dir=False,
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
        _layer_zero_redundant(), method="cprune-cosine", ratio=0.25, budget="global", calib=token_batches(count=4), cache_dir=False,
        options={"stage1_share": 0.0, "probe_tokens": 16},
    )
    counts = result.plan.kept_counts()
    assert sum(counts.values()) == 12
    assert counts[0] < counts[1], f"the layer with duplicates must lose more: {counts}"
    assert counts[0] >= 4 and result.plan.meta["max_layer_loss"] == 0.5  # default cap: twice the ratio
    assert "global_clusters" in result.plan.meta


def test_global_stage_respects_the_per_layer_cap():
    capped = compress(
        _layer_zero_redundant(), method="cprune-cosine", ratio=0.25, budget="global", calib=token_batches(count=4), cache_dir=False,
        options={"stage1_share": 0.0, "probe_tokens": 16, "max_layer_loss": 0.25},
    )
    assert capped.plan.kept_counts() == {0: 6, 1: 6}, "no layer may lose more than a quarter of its experts"


@pytest.mark.parametrize("method", ["cprune", "cprune-cosine"])
def test_group_limited_routing_is_refused_clearly(method):
    with pytest.raises(MoECompressError, match="group-limited"):
        compress(tiny_model("deepseek_v3"), method=method, ratio=0.5, calib=token_batches(), cache_dir=False)


@pytest.mark.parametrize("method", ["cprune", "cprune-cosine"])
def test_unknown_option_is_refused(method):
    with pytest.raises(MoECompressError, match="no option"):
        compress(tiny_model("mixtral"), method=method, ratio=0.5, calib=token_batches(), cache_dir=False, options={"k": 3})


# ---- reference mode ------------------------------------------------------------------------

# Seven experts, signatures in 2-D: A = {0, 1, 2, 3} around the origin, B = {4, 5}, C = {6}.
SIGNATURES = np.array([[-1.0, 0.0], [1.2, 0.0], [0.0, 0.5], [0.0, -2.5], [10.0, 0.0], [10.5, 0.0], [0.0, 12.0]])


def test_keep_coefficient_as_the_authors_wrote_it():
    # p = 1/2: exp(0) - exp(0) / (exp(0) + exp(0)) = 1 - 1/2, then 0.6 * 0.5 + 0.5
    assert keep_coefficient(16, 32) == pytest.approx(0.8)
    # p = 1: exp(-.5) - exp(.5) / (exp(.5) + exp(-.5)) = 0.60653 - 0.73106
    assert keep_coefficient(8, 8) == pytest.approx(0.5 + 0.6 * (0.6065306597 - 0.7310585786))


def test_ward_clustering_on_rows_of_the_distance_matrix():
    labels, to_centre = ward_clusters(SIGNATURES, 3)
    groups = sorted(sorted(np.flatnonzero(labels == label).tolist()) for label in set(labels))
    assert groups == [[0, 1, 2, 3], [4, 5], [6]]
    # A's centre is (0.05, -0.5): distances 1.163, 1.254, 1.001, 2.001
    assert to_centre[:4] == pytest.approx([1.16297, 1.25399, 1.00125, 2.00062], abs=1e-5)
    # the authors hand the square distance matrix to scipy's linkage, which treats its rows as observations
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist, squareform

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = fcluster(linkage(squareform(pdist(SIGNATURES)), method="ward"), t=3, criterion="maxclust")
    assert (theirs == labels).all()


def test_reference_keep_rule_on_a_hand_made_layer():
    # rate 0.25, E = 7: A (4 >= 3 members) keeps int(c(4/7) * 0.75 * 4) = int(2.21) = 2 nearest: 2 and 0;
    # B and C are smaller than 3 and kept whole.
    votes = cluster_votes(SIGNATURES, 3, rate=0.25, experts=7, small=3)
    assert votes.tolist() == [1, 0, 1, 0, 1, 1, 1]


def _pooled_stats(signatures: np.ndarray, layers: int = 1) -> dict:
    pooled = torch.tensor(signatures, dtype=torch.float16)[None]  # one calibration sequence: [1, E, H]
    return {layer: {"pooled_expert_outputs": pooled, "tokens": torch.ones(len(signatures), dtype=torch.float64)} for layer in range(layers)}


def test_reference_plan_prunes_the_least_voted_lower_index_first():
    model = tiny_model("mixtral", num_local_experts=7, num_experts_per_tok=2)
    request = PlanRequest(get_adapter(model), model.config, _pooled_stats(SIGNATURES), 0.25)
    plan = get_method("cprune").make_plan(request, {**NO_GUARD, "clusters": 3})
    # floor(0.25 * 7) = 1 removed: experts 1 and 3 have no vote; the lower index goes
    assert plan.layers[0].keep == [0, 2, 3, 4, 5, 6] and plan.layers[0].scores == [1, 0, 1, 0, 1, 1, 1]


def test_reference_global_stage_reaches_the_ratio_within_the_authors_cap():
    model = tiny_model("mixtral", num_layers=2, num_local_experts=7, num_experts_per_tok=2)
    request = PlanRequest(get_adapter(model), model.config, _pooled_stats(SIGNATURES, layers=2), 0.25, "global")
    plan = get_method("cprune").make_plan(request, {**NO_GUARD, "clusters": 3, "global_clusters": 2})
    meta = plan.meta
    assert meta["stage1_rate"] == pytest.approx(1 - math.sqrt(0.75))  # 0.134 -> floor(0.94) = 0 per layer in stage 1
    # the authors' cap: int(n1 // r1 * 0.9) with n1 = 0 forbids any stage-2 removal
    assert meta["stage2_cap"] == 0 and all(len(layer.keep) == 7 for layer in plan.layers)
    plan = get_method("cprune").make_plan(request, {**NO_GUARD, "clusters": 3, "global_clusters": 2, "stage1_rate": 0.3})
    # stage 1: floor(2.1) = 2 per layer; stage 2 removes floor(0.25 * 14) - 4 = -1 -> nothing more
    assert [len(layer.keep) for layer in plan.layers] == [5, 5]
    request = PlanRequest(get_adapter(model), model.config, _pooled_stats(SIGNATURES, layers=2), 0.5, "global")
    plan = get_method("cprune").make_plan(request, {**NO_GUARD, "clusters": 3, "global_clusters": 2, "stage1_rate": 0.3})
    # stage 2: floor(0.5 * 14) - 4 = 3 of the 10 survivors; cap int(2 // 0.3 * 0.9) = int(5.4) = 5 per layer
    assert plan.meta["stage2_count"] == 3 and plan.meta["stage2_cap"] == 5
    assert sum(len(layer.keep) for layer in plan.layers) == 7


def test_reference_refuses_fewer_experts_than_clusters():
    with pytest.raises(MoECompressError, match="only 8 experts"):
        compress(tiny_model("mixtral"), method="cprune", ratio=0.5, calib=token_batches(), cache_dir=False)


def test_pooled_signatures_are_expert_outputs_on_sequence_means():
    model = tiny_model("mixtral", num_layers=1)
    batches = token_batches(count=2, batch=2, seq_len=8)
    stats, _ = collect_statistics(model, batches, ("pooled_expert_outputs",), cache_dir=False)
    pooled = stats[0]["pooled_expert_outputs"]
    assert pooled.shape == (4, 8, model.config.hidden_size) and pooled.dtype == torch.float16
    captured = []
    block = model.model.layers[0].mlp
    handle = block.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    means = torch.cat([x.mean(dim=1) for x in captured])  # [4 sequences, H]
    expected = torch.stack([expert_forward(block.experts, e, means) for e in range(8)], dim=1).to(torch.float16)
    torch.testing.assert_close(pooled, expected, rtol=2e-3, atol=2e-3)
