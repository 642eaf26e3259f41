"""Fidelity: do our reference modes choose what the authors' code would choose? (issue 13)

For each reference model, the calibration set is captured once (per MoE layer and batch: the
MoE input, router logits, the top-k the model chose and the gates it applied), and each
method's kept experts are decided twice on it: by our reference mode (`moe_compress`), and by
a small re-implementation of the authors' arithmetic written here from reading their code --
including the parts we deliberately do differently, so the table shows what each difference
costs. Agreement is the Jaccard index of the pruned sets per MoE layer (two empty sets agree).

  REAP      CerebrasResearch/reap `pruning_metrics.update_pruning_state`, `prune.py`: softmax of the
            router logits, top-k of the raw logits, renormalised iff `config.norm_topk_prob`,
            mean over routed tokens of g * ||f||, `torch.topk(largest=False)` of int(E * ratio).
  MoNE      zxgx/mode-pd `expert_prune_by_mone`: running mean/"fluctuation" per expert hook call
            (first call adds no fluctuation), fusion (w v)((1 - w) a), threshold `> sorted[preserve]`
            per layer (`layer` scope) or over the model (`model` scope, index ceil(n * preserve / E)).
  C-Prune   Fighoture/MoE_unsupervised_pruning `cluster_for_prune` (float16 signatures, square
            distance matrix into Ward, float16 centroid distances), `generate_layerwise_pruned_map`,
            `generate_global_pruned_map` (votes, dynamic coefficient, the 0.9 cap).
  CD-MoE    duterscmy/CD-MoE `greedy_search_expert.py` / `greedy_search_layer.py`: every candidate is
            a full forward with output_hidden_states; JSD in float32 with +1e-10, F.kl_div batchmean
            per sample, mean over samples; strict `<` over candidates in ascending order.
  unified   DaizeDong/Unified-MoE-Compression `expert_drop.py`: soft_count (Mixtral wrapper) and
            gate_sum (DeepSeek wrapper) running means, `torch.topk(largest=False)`; global: raw
            scores concatenated, round() of the count.

    python bench/fidelity.py --model ref-mixtral --model ref-deepseek   # -> bench/results/fidelity.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import RESULTS

from moe_compress import condense, get_adapter, load_model
from moe_compress.engine.statistics import collect_statistics
from moe_compress.data import CalibrationSpec, calibration_batches
from moe_compress.methods import PlanRequest, get_method
from moe_compress.methods.budget import removed_count
from moe_compress.methods.condense_eval import condensed, mean_selected_gate
from moe_compress.runtime import expert_forward

RATIOS = (0.1, 0.25, 0.5)
#: The authors' code has no super-expert guard: compared with it, ours is switched off.
AS_AUTHORS = {"protect_super_experts": False}
CPRUNE_CLUSTERS = {"ref-mixtral": (4, 2), "ref-deepseek": (12, 6)}  # 8 experts cannot form 12 clusters


def jaccard(a: set, b: set) -> float:
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def agreement(ours: dict[int, set], theirs: dict[int, set]) -> dict:
    scores = [jaccard(ours[layer], theirs[layer]) for layer in sorted(ours)]
    return {"layers": len(scores), "identical": sum(s == 1.0 for s in scores), "mean_jaccard": sum(scores) / len(scores),
            "per_layer": scores}


def pruned_sets(plan) -> dict[int, set]:
    return {lp.layer: set(lp.removed) for lp in plan.layers}


# ---- capture -------------------------------------------------------------------------------
@torch.no_grad()
def capture(model, adapter, batches) -> dict[int, list[dict]]:
    """Per MoE layer, per batch: x [N, H], router logits, chosen top-k ids and applied gates, sequence length."""
    records: dict[int, list[dict]] = {}
    handles = []
    for index in adapter.moe_layer_indices(model):
        block = adapter.moe_block(adapter.decoder_layers(model)[index])
        state: dict = {}

        def on_block(_m, args, state=state):
            state["seq"] = args[0].shape[-2]

        def on_router(_m, _a, output, state=state):
            state["logits"] = output[0].reshape(-1, output[0].shape[-1]).float()

        def on_experts(_m, args, kwargs, index=index, state=state):
            values = list(args) + [v for v in kwargs.values()]
            x, top_idx, top_w = values[:3]
            records.setdefault(index, []).append({"x": x.reshape(-1, x.shape[-1]), "logits": state["logits"], "top_idx": top_idx,
                                                  "top_w": top_w.float(), "seq": state["seq"]})

        handles += [block.register_forward_pre_hook(on_block), adapter.router(block).register_forward_hook(on_router),
                    adapter.experts(block).register_forward_pre_hook(on_experts, with_kwargs=True)]
    for batch in batches:
        model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return records


# ---- the authors' arithmetic ---------------------------------------------------------------
@torch.no_grad()
def expert_norms(model, adapter, records) -> dict[int, list[torch.Tensor]]:
    """||f_e(x_t)|| for every expert on every token, per layer and batch ([N, E]): what REAP's observer records."""
    norms = {}
    for layer, batches in records.items():
        experts = adapter.experts(adapter.moe_block(adapter.decoder_layers(model)[layer]))
        num = batches[0]["logits"].shape[-1]
        norms[layer] = [torch.stack([expert_forward(experts, e, r["x"]).float().norm(dim=-1) for e in range(num)], dim=1) for r in batches]
    return norms


def authors_reap(norms, adapter, records, ratio: float, renormalize: bool, probabilities: str) -> dict[int, set]:
    """REAP's saliency; probabilities="softmax" as their observer, "model" with the model's router scores and choice."""
    pruned = {}
    for layer, batches in records.items():
        num = batches[0]["logits"].shape[-1]
        total, count = torch.zeros(num, dtype=torch.float64), torch.zeros(num, dtype=torch.float64)
        for r, layer_norms in zip(batches, norms[layer]):
            if probabilities == "softmax":
                weights = F.softmax(r["logits"], dim=1, dtype=torch.float)
                selected = torch.topk(r["logits"], r["top_idx"].shape[-1], dim=-1).indices
            else:
                weights, selected = adapter.router_probs(r["logits"]), r["top_idx"].long()
            if renormalize:
                weights = weights / torch.gather(weights, 1, selected).sum(dim=-1, keepdim=True)
            for e in range(num):
                active = (selected == e).any(dim=-1)
                total[e] += float((layer_norms[active, e] * weights[active, e]).double().sum())
                count[e] += int(active.sum())
        saliency = (total / count.clamp_min(1)).float()
        pruned[layer] = set(torch.topk(saliency, int(num * ratio), largest=False).indices.tolist())
    return pruned


def authors_mone_scores(model, adapter, records, weight: float = 0.5) -> dict[int, torch.Tensor]:
    """MoNE's fused metric with the authors' running estimates, replayed hook call by hook call."""
    scores = {}
    for layer, batches in records.items():
        experts = adapter.experts(adapter.moe_block(adapter.decoder_layers(model)[layer]))
        num = batches[0]["logits"].shape[-1]
        access, tokens = torch.zeros(num), 0
        state = {e: {"n": 0, "mean": None, "fluc": None} for e in range(num)}
        for r in batches:
            gates = torch.zeros(r["x"].shape[0], num).scatter(1, r["top_idx"].long(), r["top_w"])
            access = access * tokens / (tokens + gates.shape[0]) + gates.sum(0) / (tokens + gates.shape[0])
            tokens += gates.shape[0]
            for e in range(num):
                rows = (r["top_idx"] == e).any(dim=-1)
                if not rows.any():
                    continue
                out = expert_forward(experts, e, r["x"][rows]).float()
                s, m = state[e], out.shape[0]
                n = s["n"]
                mean = torch.zeros(out.shape[1]) if s["mean"] is None else s["mean"]
                fluc = torch.zeros(out.shape[1]) if s["fluc"] is None else s["fluc"]
                mean = mean * n / (n + m) + out.sum(0) / (n + m)
                if n > 0:
                    fluc = fluc * (n - 1) / (n + m - 1) + ((out - mean) ** 2).sum(0) / (n + m)
                state[e] = {"n": n + m, "mean": mean, "fluc": fluc}
        variation = torch.stack([torch.zeros(1) if state[e]["fluc"] is None else state[e]["fluc"].sqrt().norm().reshape(1) for e in range(num)])[:, 0]
        scores[layer] = (weight * variation) * ((1 - weight) * access)
    return scores


def authors_threshold(scores: dict[int, torch.Tensor], ratio: float, scope: str) -> dict[int, set]:
    num = next(iter(scores.values())).numel()
    preserve = num - removed_count(num, ratio)
    if scope == "model":  # preserve_n is the per-layer average there: E (1 - ratio) keeps ceil(total (1 - ratio))
        metric = torch.cat(list(scores.values()))
        index = math.ceil(len(metric) * (1 - ratio))
        threshold = torch.sort(metric, descending=True).values[index] if index < len(metric) else -math.inf
        return {layer: set(torch.where(~(s > threshold))[0].tolist()) for layer, s in scores.items()}
    pruned = {}
    for layer, s in scores.items():
        threshold = torch.sort(s, descending=True).values[preserve] if preserve < num else -math.inf
        pruned[layer] = set(torch.where(~(s > threshold))[0].tolist())
    return pruned


def _cluster_for_prune(embedding: np.ndarray, clusters: int) -> tuple[list, np.ndarray]:
    """uns_utils.cluster_for_prune('hierarchical_prune') on float16 [E, bs, H]."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist, squareform

    embedding = embedding.reshape(embedding.shape[0], -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = fcluster(linkage(squareform(pdist(embedding)), method="ward"), t=clusters, criterion="maxclust").tolist()
    centres = []
    for cluster_id in range(1, clusters + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            centres.append(np.mean(embedding[np.array(labels) == cluster_id], axis=0))
    distances = np.array([np.linalg.norm(sample - centres[labels[i] - 1]) for i, sample in enumerate(embedding)], dtype=float)
    return labels, distances


def _dynamic_coef(length: int, total: int) -> float:
    p = length / total
    return (math.exp(0.5 - p) - math.exp(p - 0.5) / (math.exp(p - 0.5) + math.exp(0.5 - p))) * 0.6 + 0.5


def _votes(outputs: np.ndarray, clusters: int, rate: float, experts_per_layer: int, batch: int) -> dict[int, int]:
    votes = {i: 0 for i in range(outputs.shape[0])}
    total = outputs.shape[1]
    for b in range(total // batch + 1):
        start, end = min(b * batch, total), min((b + 1) * batch, total)
        if end == start:
            continue
        labels, distances = _cluster_for_prune(outputs[:, start:end, :].astype(np.float16), clusters)
        members: dict = {}
        for expert, label in enumerate(labels):
            members.setdefault(label, {})[expert] = distances[expert]
        for info in members.values():
            chosen = info.items() if len(info) < 3 else sorted(info.items(), key=lambda kv: kv[1])[
                : int(_dynamic_coef(len(info), experts_per_layer) * (1 - rate) * len(info))]
            for expert, _ in chosen:
                votes[expert] += 1
    return votes


def authors_cprune(stats, meta: dict, budget: str) -> dict[int, set]:
    """Both C-Prune stages on the same pooled signatures, with our plan's stage rates."""
    clusters, global_clusters, batch = meta["clusters"], meta["global_clusters"], meta["batch"]
    rate1 = meta["stage1_rate"]
    outputs = {layer: s["pooled_expert_outputs"].transpose(0, 1).numpy() for layer, s in stats.items()}
    num = next(iter(outputs.values())).shape[0]
    pruned = {}
    for layer, out in outputs.items():
        votes = _votes(out, clusters, rate1, num, batch)
        pruned[layer] = sorted(e for e, _ in sorted(votes.items(), key=lambda kv: kv[1])[: int(rate1 * num)])
    if budget == "global" and "stage2_rate" in meta:
        rate2 = meta["stage2_rate"]
        remain = [(layer, [e for e in range(num) if e not in pruned[layer]]) for layer in sorted(outputs)]
        length = len(remain[0][1])
        stacked = np.concatenate([outputs[layer][experts] for layer, experts in remain])
        votes = _votes(stacked, global_clusters, rate2, num, batch)
        chosen = sorted(votes.items(), key=lambda kv: kv[1])[: int(rate2 * len(votes))]
        extra: dict[int, list] = {}
        for index, _ in chosen:
            layer, experts = remain[index // length]
            extra.setdefault(layer, []).append(int(experts[index % length]))
        for layer in outputs:
            first, second = pruned[layer], extra.get(layer, [])
            cap = int(len(first) // rate1 * 0.9)
            if len(first) + len(second) > cap:
                second = second[:cap]
            pruned[layer] = sorted(second + first)
    return {layer: set(p) for layer, p in pruned.items()}


def authors_unified(records, adapter, ratio: float, budget: str, criterion: str) -> dict[int, set]:
    scores = {}
    for layer, batches in records.items():
        num, value, samples = batches[0]["logits"].shape[-1], None, 0
        for r in batches:
            if criterion == "soft_count":
                weights = F.softmax(r["logits"], dim=1, dtype=torch.float)
            else:
                weights = torch.zeros(r["x"].shape[0], num).scatter(1, r["top_idx"].long(), r["top_w"])
            size = weights.shape[0]
            value = weights.sum(0) / size if value is None else value * samples / (samples + size) + weights.sum(0) / (samples + size)
            samples += size
        scores[layer] = value
    num = next(iter(scores.values())).numel()
    if budget == "layer":
        return {layer: set(torch.topk(s, removed_count(num, ratio), largest=False).indices.tolist()) for layer, s in scores.items()}
    # Their CLI takes an integer preserve_n, dropping (E - preserve_n) * L exactly; for a ratio the count is ours.
    drop = removed_count(num * len(scores), ratio)
    flat = torch.cat([scores[layer] for layer in sorted(scores)])
    chosen = torch.topk(flat, drop, largest=False).indices.tolist()
    layers = sorted(scores)
    return {layer: {i - num * p for i in chosen if num * p <= i < num * (p + 1)} for p, layer in enumerate(layers)}


# ---- CD-MoE --------------------------------------------------------------------------------
def _authors_jsd(origin: list[torch.Tensor], pruned: list[torch.Tensor]) -> float:
    total = 0.0
    for o, p in zip(origin, pruned):
        pp, qq = F.softmax(o, dim=-1), F.softmax(p, dim=-1)
        m = 0.5 * (pp + qq)
        kl = lambda a, b: F.kl_div((b + 1e-10).log(), a + 1e-10, reduction="batchmean")  # noqa: E731
        total += float(0.5 * (kl(pp, m) + kl(qq, m)))
    return total / len(origin)


@torch.no_grad()
def _hidden(model, batches, index: int | None) -> list[torch.Tensor]:
    """Per sequence: hidden_states[index + 1] (a decoder layer's output) or the final normed state."""
    outputs = []
    for batch in batches:
        result = model.model(input_ids=batch, output_hidden_states=True, use_cache=False)
        state = result.last_hidden_state if index is None else result.hidden_states[index + 1]
        outputs += [row.float() for row in state]
    return outputs


def authors_cd_moe(model, adapter, batches, stats, experts: int, layers: int) -> tuple[dict[int, list[int]], list[int]]:
    decoder = adapter.decoder_layers(model)
    moe_layers = adapter.moe_layer_indices(model)
    weights = {layer: mean_selected_gate(stats[layer]) for layer in moe_layers}
    orders = {}
    for layer in moe_layers:
        origin, block, order = _hidden(model, batches, layer), adapter.moe_block(decoder[layer]), []
        while len(order) < experts:
            best, best_expert = 1e6, -1
            for candidate in [e for e in range(adapter.num_experts(block)) if e not in order]:
                with condensed(adapter, block, order + [candidate], weights[layer]):
                    value = _authors_jsd(origin, _hidden(model, batches, layer))
                if value < best:
                    best, best_expert = value, candidate
            order.append(best_expert)
        orders[layer] = order
    origin, chosen = _hidden(model, batches, None), []
    while len(chosen) < layers:
        scored = []
        for candidate in [layer for layer in moe_layers if layer not in chosen]:
            group = chosen + [candidate]
            with _condensed_group(adapter, decoder, {g: orders[g][:experts] for g in group}, weights):
                scored.append((group, _authors_jsd(origin, _hidden(model, batches, None))))
        chosen = sorted(scored, key=lambda item: item[1])[0][0]
    return orders, chosen


def _condensed_group(adapter, decoder, sets, weights):
    from contextlib import ExitStack

    stack = ExitStack()
    for layer, experts in sets.items():
        stack.enter_context(condensed(adapter, adapter.moe_block(decoder[layer]), experts, weights[layer]))
    return stack


# ---- the bench -----------------------------------------------------------------------------
def run(model_name: str, samples: int, cd_samples: int, cd_seq_len: int) -> dict:
    model, tokenizer = load_model(model_name)
    adapter = get_adapter(model)
    batches = calibration_batches(tokenizer, CalibrationSpec("bundled", samples, 256, 0))
    names = ("reap_sum", "reap_prob_sum", "selected", "gate_sum", "output_moments", "output_moments_per_batch", "router_dist_sum",
             "pooled_expert_outputs", "tokens")
    stats, _ = collect_statistics(model, batches, names, cache_dir=False)
    records = capture(model, adapter, batches)
    request = lambda ratio, budget="layer": PlanRequest(adapter, model.config, stats, ratio, budget)  # noqa: E731
    renorm_literal = bool(getattr(model.config, "norm_topk_prob", False))
    renorm_model = adapter.renormalizes_top_k(model.config)
    result: dict = {"model": model_name, "samples": samples, "rows": []}

    def add(method: str, ratio, budget: str, compared: str, ours: dict, theirs: dict) -> None:
        row = {"method": method, "ratio": ratio, "budget": budget, "compared_with": compared, **agreement(ours, theirs)}
        result["rows"].append(row)
        print(f"{model_name} {method} {ratio} {budget} vs {compared}: {row['identical']}/{row['layers']} identical", flush=True)

    clusters, global_clusters = CPRUNE_CLUSTERS[model_name]
    norms, mone_scores = expert_norms(model, adapter, records), authors_mone_scores(model, adapter, records)
    for ratio in RATIOS:
        ours = pruned_sets(get_method("reap").make_plan(request(ratio), AS_AUTHORS))
        add("reap", ratio, "layer", "authors' code as written", ours, authors_reap(norms, adapter, records, ratio, renorm_literal, "softmax"))
        add("reap", ratio, "layer", "authors' rule, the model's router scores and renormalisation", ours,
            authors_reap(norms, adapter, records, ratio, renorm_model, "model"))
        for budget, scope in (("layer", "layer"), ("global", "model")):
            theirs = authors_threshold(mone_scores, ratio, scope)
            add("mone", ratio, budget, f"authors' code ({scope} scope)", pruned_sets(get_method("mone").make_plan(request(ratio, budget), AS_AUTHORS)), theirs)
            add("mone variance=exact", ratio, budget, f"authors' code ({scope} scope)",
                pruned_sets(get_method("mone").make_plan(request(ratio, budget), {**AS_AUTHORS, "variance": "exact"})), theirs)
        for budget in ("layer", "global"):
            plan = get_method("cprune").make_plan(request(ratio, budget), {**AS_AUTHORS, "clusters": clusters, "global_clusters": global_clusters})
            add("cprune", ratio, budget, f"authors' code ({clusters}/{global_clusters} clusters)", pruned_sets(plan),
                authors_cprune(stats, plan.meta, budget))
            for criterion in ("soft_count", "gate_sum"):
                if criterion == "soft_count" and adapter.router_score != "softmax":
                    continue  # the framework's soft_count wrapper exists for softmax routers only
                add(criterion, ratio, budget, "unified framework's code", pruned_sets(get_method(criterion).make_plan(request(ratio, budget), AS_AUTHORS)),
                    authors_unified(records, adapter, ratio, budget, criterion))

    cd_batches = [b[:, :cd_seq_len] for b in calibration_batches(tokenizer, CalibrationSpec("bundled", cd_samples, 256, 1, batch_size=cd_samples))]
    cd_stats, _ = collect_statistics(model, cd_batches, ("gate_sum", "selected"), cache_dir=False)
    experts, layers = adapter.top_k(model.config), 3
    start = time.perf_counter()
    ours = condense(copy.deepcopy(model), layers=layers, calib=cd_batches, cache_dir=False).plan
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    orders, chosen = authors_cd_moe(model, adapter, cd_batches, cd_stats, experts, layers)
    theirs_seconds = time.perf_counter() - start
    ours_sets = {int(k): set(v[:experts]) for k, v in ours.meta["expert_orders"].items()}
    add("cd-moe", f"K={experts}", "kept sets", "authors' greedy search", ours_sets, {k: set(v) for k, v in orders.items()})
    result["cd_moe"] = {"ours_order": ours.meta["order"], "authors_order": chosen, "ours_expert_orders": ours.meta["expert_orders"],
                        "authors_expert_orders": {str(k): v for k, v in orders.items()}, "calibration": f"{cd_samples} x {cd_seq_len} tokens",
                        "ours_seconds": round(ours_seconds, 1), "authors_seconds": round(theirs_seconds, 1)}
    print(f"{model_name} cd-moe layer order ours {ours.meta['order']} authors {chosen}", flush=True)
    return result


def summary(results: list[dict]) -> list[str]:
    lines = ["## Summary: layers identical, over every ratio and budget", "", "| method | compared with | " +
             " | ".join(r["model"] for r in results) + " | all |", "|---|---|" + "---|" * (len(results) + 1)]
    comparisons = sorted({(row["method"], row["compared_with"].split(" (")[0]) for r in results for row in r["rows"]})
    for method, compared in comparisons:
        cells, total = [], [0, 0]
        for result in results:
            rows = [row for row in result["rows"] if row["method"] == method and row["compared_with"].split(" (")[0] == compared]
            same, layers = sum(row["identical"] for row in rows), sum(row["layers"] for row in rows)
            cells.append(f"{same}/{layers} ({same / layers:.0%})" if layers else "-")
            total = [total[0] + same, total[1] + layers]
        lines.append(f"| {method} | {compared} | " + " | ".join(cells) + f" | {total[0] / total[1]:.0%} |")
    return lines + [""]


def report(results: list[dict]) -> str:
    lines = ["# Fidelity: our reference modes against the authors' arithmetic", "",
             "Command: `python bench/fidelity.py --model ref-mixtral --model ref-deepseek`. Each row decides the pruned "
             "experts twice on the same calibration capture (bundled calib split, seeded windows of 256 tokens): with our "
             "reference mode and with a re-implementation of the authors' code (see the docstring of bench/fidelity.py). "
             "Agreement: per MoE layer, the Jaccard index of the two pruned sets; 'identical' counts layers with index 1.", ""]
    lines += summary(results)
    for result in results:
        lines += [f"## {result['model']} ({result['samples']} calibration sequences)", "",
                  "| method | ratio | budget | compared with | layers identical | mean Jaccard |", "|---|---|---|---|---|---|"]
        for row in result["rows"]:
            lines.append(f"| {row['method']} | {row['ratio']} | {row['budget']} | {row['compared_with']} | "
                         f"{row['identical']}/{row['layers']} ({row['identical'] / row['layers']:.0%}) | {row['mean_jaccard']:.3f} |")
        cd = result["cd_moe"]
        lines += ["", f"CD-MoE on {cd['calibration']}: layer order ours {cd['ours_order']}, authors {cd['authors_order']} "
                  f"(ours {cd['ours_seconds']} s, the authors' full-forward search {cd['authors_seconds']} s).", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--cd-samples", type=int, default=4)
    parser.add_argument("--cd-seq-len", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS / "fidelity")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = [run(name, args.samples, args.cd_samples, args.cd_seq_len) for name in args.model or ["ref-mixtral", "ref-deepseek"]]
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(report(results))
