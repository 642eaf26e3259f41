"""The sequential observer: same activations as the full model, statistics equal brute force."""

from __future__ import annotations

import pytest
import torch

from helpers import token_batches
from moe_compress import MoECompressError, compress, get_adapter
from moe_compress.engine.statistics import collect_statistics
from moe_compress.walk import STATISTICS, observe_expert_statistics, run_sequential
from moe_compress.walk.moments import merge_moments
from tiny_models import FAMILIES, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_by_layer_equals_full_forward(family):
    model = tiny_model(family)
    batches = token_batches()
    hidden = run_sequential(model, get_adapter(model), batches)
    with torch.no_grad():
        for h, batch in zip(hidden, batches):
            full = model.model(input_ids=batch).last_hidden_state
            assert torch.equal(model.model.norm(h), full)


#: Statistics with one value per expert (the pooled signatures are checked in test_cprune.py, the
#: per-batch moments below).
# the whole layer's statistics (`Statistic.sees_block`) are checked by hand in tests/test_fit_block_drop.py
PER_EXPERT = tuple(name for name, s in STATISTICS.items() if name != "pooled_expert_outputs" and not s.per_batch and not s.sees_block)


def test_per_batch_moments_merge_to_the_moments():
    model = tiny_model("qwen2_moe")
    batches = token_batches(count=3)
    stats, _ = collect_statistics(model, batches, ("output_moments", "output_moments_per_batch"), cache_dir=False)
    for layer_stats in stats.values():
        per_batch = layer_stats["output_moments_per_batch"]
        assert per_batch.shape[0] == len(batches)
        merged = per_batch[0]
        for moments in per_batch[1:]:
            merged = merge_moments(merged, moments)
        torch.testing.assert_close(merged, layer_stats["output_moments"], rtol=1e-9, atol=1e-9)


def _brute_force(model, adapter, batches):
    """Reference statistics from buffering every token's routing and every expert's output."""
    records: dict[int, list] = {}
    handles = []
    for index in adapter.moe_layer_indices(model):
        block = adapter.moe_block(adapter.decoder_layers(model)[index])
        experts = adapter.experts(block)
        router = adapter.router(block)

        def hook(module, args, output, index=index, experts=experts):
            logits, weights, chosen = output
            x = args[0].reshape(-1, args[0].shape[-1])
            outs = torch.stack([experts(x, torch.full((x.shape[0], 1), e), torch.ones(x.shape[0], 1)) for e in range(8)], 1)
            records.setdefault(index, []).append((logits.reshape(x.shape[0], -1), weights, chosen, outs))

        handles.append(router.register_forward_hook(hook))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for handle in handles:
        handle.remove()
    reference = {}
    for index, parts in records.items():
        sums = {name: torch.zeros(8, dtype=torch.float64) for name in PER_EXPERT}
        hidden = parts[0][3].shape[-1]
        sums["logit_gram"] = torch.zeros(8, 8, dtype=torch.float64)
        sums["output_sum_all"] = torch.zeros(8, hidden, dtype=torch.float64)
        sums["gated_output_sum_all"] = torch.zeros(8, hidden, dtype=torch.float64)
        sums["gated_output_sums"] = torch.zeros(8, 1 + hidden, dtype=torch.float64)
        routed_outputs: dict[int, list[torch.Tensor]] = {e: [] for e in range(8)}
        for logits, weights, chosen, outs in parts:
            probs = adapter.router_probs(logits).double()
            for t in range(logits.shape[0]):
                sums["tokens"] += 1
                sums["prob_sum"] += probs[t]
                sums["router_dist_sum"] += probs[t] / probs[t].sum() if adapter.router_score == "sigmoid" else probs[t]
                sums["logit_gram"] += torch.outer(logits[t].double(), logits[t].double())
                sums["output_sum_all"] += outs[t].double()
                sums["gated_output_sum_all"] += probs[t][:, None] * outs[t].double()
                total_w = float(weights[t].double().sum())
                for slot in range(chosen.shape[1]):
                    e, g = int(chosen[t, slot]), float(weights[t, slot])
                    norm = float(outs[t, e].double().norm())
                    sums["selected"][e] += 1
                    sums["gate_sum"][e] += g
                    sums["output_norm_sum"][e] += norm
                    sums["reap_sum"][e] += g / total_w * norm
                    sums["reap_prob_sum"][e] += float(probs[t, e]) * norm
                    sums["gated_output_energy"][e] += (g * norm) ** 2
                    sums["gated_output_sums"][e] += g**2 * torch.cat([torch.ones(1, dtype=torch.float64), outs[t, e].double()])
                    sums["max_output_abs"][e] = max(float(sums["max_output_abs"][e]), float(outs[t, e].abs().max()))
                    routed_outputs[e].append(outs[t, e].double())
        sums["output_moments"] = torch.zeros(8, 1 + 2 * hidden, dtype=torch.float64)
        for e, rows in routed_outputs.items():
            if rows:
                stacked = torch.stack(rows)
                mean = stacked.mean(0)
                sums["output_moments"][e] = torch.cat([torch.tensor([len(rows)], dtype=torch.float64), mean, ((stacked - mean) ** 2).sum(0)])
        reference[index] = sums
    return reference


@pytest.mark.parametrize("family", FAMILIES)
def test_statistics_equal_brute_force(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    batches = token_batches()
    observed = observe_expert_statistics(model, adapter, batches, PER_EXPERT)
    reference = _brute_force(model, adapter, batches)
    assert observed.keys() == reference.keys()
    for index in reference:
        for name in PER_EXPERT:
            torch.testing.assert_close(observed[index][name], reference[index][name], rtol=1e-5, atol=1e-6, msg=f"{name} layer {index}")


def test_only_requested_statistics_are_collected():
    model = tiny_model("mixtral")
    stats = observe_expert_statistics(model, get_adapter(model), token_batches(), ("selected",))
    assert set(stats[0]) == {"selected", "tokens"}


def test_statistics_cache_hits_for_same_model_and_data_only(tmp_path):
    model = tiny_model("mixtral")
    batches = token_batches()
    first, hit = collect_statistics(model, batches, ("reap_sum", "selected"), cache_dir=tmp_path)
    assert not hit
    second, hit = collect_statistics(model, batches, ("reap_sum", "selected"), cache_dir=tmp_path)
    assert hit
    assert all(torch.equal(first[i][n], second[i][n]) for i in first for n in first[i])
    _, hit = collect_statistics(model, token_batches(seed=1), ("reap_sum", "selected"), cache_dir=tmp_path)
    assert not hit, "different calibration data must not hit the cache"
    _, hit = collect_statistics(tiny_model("mixtral", seed=1), batches, ("reap_sum", "selected"), cache_dir=tmp_path)
    assert not hit, "a different model must not hit the cache"
    _, hit = collect_statistics(model, batches, ("selected",), cache_dir=tmp_path)
    assert hit, "a subset of a cached entry is answered from it"
    _, hit = collect_statistics(model, batches, ("signature_similarity@3",), cache_dir=tmp_path)
    assert not hit, "a statistic no cached entry holds is observed"


@pytest.mark.parametrize("family", FAMILIES)
def test_observing_leaves_every_layer_output_unchanged(family):
    """The capturing experts forward computes what the model's own experts forward computes, bit for bit."""
    from moe_compress.walk.observer import _expert_statistics_hooks
    from moe_compress.walk.statistics import LayerAccumulator

    model = tiny_model(family)
    adapter = get_adapter(model)
    batches = token_batches()
    plain = run_sequential(model, adapter, batches)
    names = ("reap_sum", "selected", "output_moments", "tokens")

    def observe(_index, layer):
        block = adapter.moe_block(layer)
        return None if block is None else _expert_statistics_hooks(adapter, layer, block, LayerAccumulator(names))

    observed = run_sequential(model, adapter, batches, observe)
    assert all(torch.equal(a, b) for a, b in zip(plain, observed))


def test_layer_inputs_passed_positionally_are_carried_by_name():
    """Gemma 4's stack hands each layer its per-layer input positionally (issue 20 item 10): the walk carries it."""
    model = tiny_model("gemma4_text", hidden_size_per_layer_input=8)
    batches = token_batches(2)
    hidden = run_sequential(model, get_adapter(model), batches)
    with torch.no_grad():
        for h, batch in zip(hidden, batches):
            assert torch.equal(model.model.norm(h), model.model(input_ids=batch).last_hidden_state)


def test_a_positional_layer_input_without_a_name_is_refused_before_calibration(tmp_path):
    model = tiny_model("gemma4_text", hidden_size_per_layer_input=8)
    layer = get_adapter(model).decoder_layers(model)[0]
    original = layer.forward
    layer.forward = lambda hidden_states, *args, **kwargs: original(hidden_states, *args, **kwargs)
    with pytest.raises(MoECompressError) as refused:
        compress(model, "reap", 0.5, "layer", token_batches(), out=tmp_path / "out", cache_dir=False)
    message = str(refused.value)
    assert message.startswith("Gemma4TextDecoderLayer is called with 1 extra positional argument(s) that its forward does not name, ")
    assert message.endswith("not supported (`moe-compress families` lists the supported types).") and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_max_output_abs_is_the_widened_maximum_bit_for_bit():
    """The statistic takes max(max x, -min x) in the layer's dtype; it must equal max |float(x)|, exactly."""
    from moe_compress.walk.routed_batch import RoutedBatch

    generator = torch.Generator().manual_seed(3)
    outputs = (torch.randn(12, 64, generator=generator) * 40).to(torch.bfloat16)
    outputs[1] = -outputs[1].abs()  # every channel negative: the peak is -min
    outputs[2] = 0.0
    outputs[3] = -0.0
    outputs[4, 5] = -1e30  # far out of the rest's range, negative
    top_idx = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 1], [2, 1], [0, 2]])
    batch = RoutedBatch(torch.zeros(6, 64), torch.zeros(6, 4), top_idx, torch.ones(6, 2), None, None, outputs)
    widened = outputs.float().abs().amax(dim=-1).double()
    expected = torch.zeros(4, dtype=torch.float64).scatter_reduce_(0, batch.pair_expert, widened, reduce="amax")
    got = STATISTICS["max_output_abs"].update(batch)
    assert torch.equal(got, expected) and not torch.signbit(got).any()
    assert got[3] == 0.0  # expert 3 took no token
