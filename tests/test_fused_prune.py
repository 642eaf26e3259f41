"""A streamed prune under a layer-wise budget writes each layer during its calibration walk (engine.fused):
the same bytes as the two-pass streamed path and as in memory, each layer read once."""

from __future__ import annotations

import filecmp
import json
import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch

from helpers import token_batches
from moe_compress.engine import fused
from moe_compress.engine.statistics import collect_statistics, superset_statistics
from moe_compress.methods import METHODS, PlanRequest
from moe_compress.methods.registry import PROTECT
from moe_compress.methods.super_experts import considered_layers
from moe_compress.source.load import load_model
from moe_compress.sink.stored_views import KeptExperts
from moe_compress.sink.writer import ShardWriter
from moe_compress.source.residency import StreamedWeights
from moe_compress.stages.prune import prune
from moe_compress import get_adapter
from tiny_models import tiny_model

FAMILIES = ("qwen3_moe", "deepseek_v3", "qwen2_moe", "mixtral")
_RUN_FACTS = ("seconds", "peak_rss_bytes", "streamed")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused-sources")
    for model_type in FAMILIES:
        tiny_model(model_type).save_pretrained(root / model_type)
    return root


def _without_fingerprints(plan: dict) -> dict:
    """Streamed and in-memory runs identify the model by different fingerprints; nothing else may differ."""
    return {**plan, "identity": {k: v for k, v in (plan.get("identity") or {}).items() if k != "fingerprints"}}


def _same_output(a: Path, b: Path, same_identity: bool) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name == "moe_compress_summary.json":  # all but times, memory and whether it streamed
            first, second = ({k: v for k, v in json.loads((d / name).read_text()).items() if k not in _RUN_FACTS} for d in (a, b))
            assert first == second
        elif name == "moe_compress_plan.json" and not same_identity:
            assert _without_fingerprints(json.loads((a / name).read_text())) == _without_fingerprints(json.loads((b / name).read_text()))
        else:
            assert filecmp.cmp(a / name, b / name, shallow=False), f"{name} differs"


class _Runs:
    """Prune one checkpoint three ways: in memory, streamed in two passes, streamed fused; count what each streamed run reads."""

    def __init__(self, monkeypatch, tmp_path: Path, source: Path):
        self.monkeypatch, self.tmp_path, self.source = monkeypatch, tmp_path, source
        self.reads: dict[str, Counter] = {}
        self.fused_calls = 0

    def run(self, how: str, **kwargs) -> Path:
        out = self.tmp_path / how
        reads = self.reads[how] = Counter()
        original, real_fused = StreamedWeights.materialize, fused.fused_prune

        def counting(weights, names, *args, **kw):
            reads.update(name for name in names if ".layers." in name)
            return original(weights, names, *args, **kw)

        def spying(*args, **kw):
            self.fused_calls += 1
            return real_fused(*args, **kw)

        with self.monkeypatch.context() as patch:
            patch.setattr(StreamedWeights, "materialize", counting)
            patch.setattr("moe_compress.stages.prune.fused_prune", spying)
            if how == "two-pass":
                patch.setattr("moe_compress.stages.prune.fuses", lambda *a: False)
            prune(self.source, out=out, cache_dir=False, streaming=how != "memory", calib=token_batches(), **kwargs)
        return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,options", [("reap", {}), ("mone", {}), ("frequency", {}), ("reap", {PROTECT: False})])
def test_a_fused_prune_writes_the_bytes_of_the_two_pass_and_in_memory_ones(checkpoints, tmp_path, monkeypatch, family, method, options):
    runs = _Runs(monkeypatch, tmp_path, checkpoints / family)
    outputs = {how: runs.run(how, method=method, ratio=0.5, budget="layer", options=options) for how in ("fused", "two-pass", "memory")}
    assert runs.fused_calls == 1, "only the default streamed run fuses"
    _same_output(outputs["fused"], outputs["two-pass"], same_identity=True)
    _same_output(outputs["fused"], outputs["memory"], same_identity=False)
    layers = {name.split(".layers.")[1].split(".")[0] for name in runs.reads["fused"]}
    assert len(layers) == tiny_model(family).config.num_hidden_layers
    assert set(runs.reads["two-pass"].values()) == {2}, "the two-pass path reads every layer tensor twice"
    if options.get(PROTECT) is False:
        assert set(runs.reads["fused"].values()) == {1}, "without the guard every layer is settled during its visit: read once"


@pytest.mark.parametrize("family", FAMILIES)
def test_a_fused_prune_frees_what_it_cuts_away_and_holds_no_written_layer_when_it_reads_the_next(checkpoints, tmp_path, monkeypatch, family):
    """Its peak memory is the two-pass path's (issue #24): each tensor the surgery replaces is freed as its
    replacement comes into being (the walk does not keep the original beside its slice), and nothing of a cut
    layer -- what was replaced, what was written -- is alive when the next tensors are read (no frame, writer or
    buffer pool keeps it). Seen through weak references to the tensors' storages; every group is written at once
    (the writer otherwise holds a tiny model's groups until a shard fills up)."""
    monkeypatch.setattr(ShardWriter.__init__, "__defaults__", (1,))
    cut_layers: list[weakref.ref] = []
    surgeries = {"apply_layer_plan": 0, "keep_routing": 0}

    def cutting(real, name):  # the whole cut, or (kept experts written from the read buffers) the router's alone
        def cut(layer, *args):
            before = [weakref.ref(t.untyped_storage()) for t in layer.state_dict().values()]
            real(layer, *args)
            kept = {id(t.untyped_storage()) for t in layer.state_dict().values()}
            replaced = [ref for ref in before if id(ref()) not in kept]
            assert replaced and all(ref() is None for ref in replaced), "replaced tensors outlive the surgery"
            cut_layers.extend([*before, *(weakref.ref(t.untyped_storage()) for t in layer.state_dict().values())])
            surgeries[name] += 1
        return cut

    real_read = StreamedWeights.materialize

    def read(weights, names, *args, **kw):
        assert all(ref() is None for ref in cut_layers), "a cut layer's tensors are alive when the next tensors are read"
        return real_read(weights, names, *args, **kw)

    for name in surgeries:
        monkeypatch.setattr(fused, name, cutting(getattr(fused, name), name))
    monkeypatch.setattr(KeptExperts, "cut", lambda self: pytest.fail("the kept experts were cut: written as views of the read buffers, nothing is"))
    monkeypatch.setattr(StreamedWeights, "materialize", read)
    prune(checkpoints / family, "reap", 0.5, "layer", token_batches(), out=tmp_path / "out", cache_dir=False, streaming=True,
          options={PROTECT: False})
    assert cut_layers, "the prune fused"
    assert surgeries["apply_layer_plan"] == 0 and surgeries["keep_routing"] > 0, (
        "experts stored one tensor each: every layer's kept experts are written from the read buffers, never cut")


def test_an_explicit_budget_fuses_to_the_same_bytes(checkpoints, tmp_path, monkeypatch):
    source = checkpoints / "qwen3_moe"
    model = tiny_model("qwen3_moe")
    moe_layers = get_adapter(model).moe_layer_indices(model)
    keep = {layer: model.config.num_experts - 2 - position % 2 * 2 for position, layer in enumerate(moe_layers)}
    runs = _Runs(monkeypatch, tmp_path, source)
    outputs = {how: runs.run(how, method="ean", budget="explicit", keep=keep) for how in ("fused", "two-pass", "memory")}
    assert runs.fused_calls == 1
    _same_output(outputs["fused"], outputs["two-pass"], same_identity=True)
    _same_output(outputs["fused"], outputs["memory"], same_identity=False)


def test_layers_the_guard_cannot_settle_wait_and_are_read_again_with_the_same_bytes(checkpoints, tmp_path, monkeypatch):
    """A threshold floor of -inf settles no guarded layer before all of them are observed: every considered layer
    waits, the layers behind it too, and all are read again after the walk -- still the two-pass bytes."""
    monkeypatch.setattr(fused, "threshold_floor", lambda seen, total: float("-inf"))
    runs = _Runs(monkeypatch, tmp_path, checkpoints / "mixtral")
    outputs = {how: runs.run(how, method="reap", ratio=0.5, budget="layer") for how in ("fused", "two-pass")}
    _same_output(outputs["fused"], outputs["two-pass"], same_identity=True)
    model = tiny_model("mixtral")
    guarded = [layer for layer in get_adapter(model).moe_layer_indices(model) if layer < considered_layers(model.config.num_hidden_layers)]
    times = {int(name.split(".layers.")[1].split(".")[0]): count for name, count in runs.reads["fused"].items()}
    assert len(guarded) > 1 and times == {layer: 2 if layer < guarded[-1] else 1 for layer in times}, "read again: those before the last guarded layer"


def test_global_budgets_merging_methods_and_cached_statistics_do_not_fuse(checkpoints, tmp_path, monkeypatch):
    runs = _Runs(monkeypatch, tmp_path, checkpoints / "qwen3_moe")
    runs.run("global", method="reap", ratio=0.5, budget="global")
    runs.run("merging", method="hc-smoe", ratio=0.5, budget="layer")
    assert runs.fused_calls == 0
    cache = tmp_path / "cache"
    for how in ("first", "cached"):
        prune(checkpoints / "qwen3_moe", "reap", 0.5, "layer", token_batches(), out=tmp_path / how, cache_dir=cache, streaming=True)
    first = json.loads((tmp_path / "first" / "moe_compress_summary.json").read_text())
    cached = json.loads((tmp_path / "cached" / "moe_compress_summary.json").read_text())
    assert (first["statistics_from_cache"], cached["statistics_from_cache"]) == (False, True), "the fused run filled the cache"
    for name in ("model.safetensors", "config.json", "moe_compress_plan.json"):
        assert filecmp.cmp(tmp_path / "first" / name, tmp_path / "cached" / name, shallow=False)


@pytest.mark.parametrize("budget", ["layer", "explicit"])
def test_every_layer_local_method_plans_a_layer_from_its_statistics_alone(checkpoints, budget):
    """What `Method.layer_local` claims: without the guard, a layer's plan from that layer's statistics is its entry in the
    plan from every layer's (novice vectors included)."""
    model, _ = load_model(checkpoints / "qwen3_moe")
    adapter = get_adapter(model)
    local = [m for m in METHODS.values() if m.layer_local]
    assert {"reap", "mone", "frequency", "ean", "cprune"} <= {m.name for m in local}
    stats, _ = collect_statistics(model, token_batches(count=4), superset_statistics(), cache_dir=False)
    experts = model.config.num_experts
    keep = {layer: experts - 2 - layer % 2 * 2 for layer in stats} if budget == "explicit" else None
    for method in local:
        options = {PROTECT: False, **({"clusters": 3} if method.name == "cprune" else {})}
        request = PlanRequest(adapter, model.config, stats, 0.5, budget, model=model, keep=keep)
        whole = method.make_plan(request, options)
        for layer in stats:
            alone = method.make_plan(PlanRequest(adapter, model.config, {layer: stats[layer]}, 0.5, budget, model=model,
                                                 keep=None if keep is None else {layer: keep[layer]}), options)
            assert alone.layers == [lp for lp in whole.layers if lp.layer == layer], (method.name, layer)
            vectors = (alone.novice_vectors.get(layer), whole.novice_vectors.get(layer))
            assert vectors[0] is vectors[1] or torch.equal(*vectors), (method.name, layer)
