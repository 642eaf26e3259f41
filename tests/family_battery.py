"""The family battery: every pipeline path on one model type's tiny model, with what must hold.

`run_battery(model_type, root)` runs each case, records a pass/fail line per case (an exception
is recorded, not raised, so one broken path does not hide the others), and returns the jobs
for the fresh-process reload. The session fixture `battery` runs it for every supported type
and batches all reloads in one process; `test_families.py` turns the records into tests.
"""

from __future__ import annotations

import copy
import json
import struct
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from helpers import load_in_fresh_process, round_experts, save_expected, selected_experts, token_batches
from moe_compress import KeepLayer, MoECompressError, Plan, apply_plan, compress, get_adapter, prune_experts, quantize, save_compressed, slim
from moe_compress.arch import auto_model_class
from moe_compress.arch.adapter import TextOnlyCalibrationWarning
from moe_compress.arch.table import unloadable_when_packed
from moe_compress.methods.expert_pruning import routing_limits
from moe_compress.walk.observer import run_sequential
from moe_compress.slimming.quantize import PER_EXPERT_STORAGE
from tiny_models import LAYERS, SUPPORTED, VOCAB, tiny_config, tiny_model


@dataclass
class BatteryResult:
    model_type: str
    outcomes: dict[str, str] = field(default_factory=dict)  # case -> "ok" or the failure
    jobs: list[dict] = field(default_factory=list)  # fresh-process reloads: path, remote, auto class
    quantized: dict = field(default_factory=dict)  # 4-bit quantize: how the experts were stored, their size, or why refused
    seconds: float = 0.0


def _keep_plan(model, adapter, keep: dict[int, list[int]]) -> Plan:
    limits = routing_limits(adapter, model.config)
    layers = adapter.decoder_layers(model)
    return Plan(
        model_type=adapter.model_type, top_k=limits.top_k,
        layers=[KeepLayer(layer=i, num_experts=adapter.num_experts(adapter.moe_block(layers[i])), keep=k) for i, k in keep.items()],
        routing_groups=limits.groups, groups_per_token=limits.groups_per_token, min_per_group=limits.min_per_group,
    )


def non_uniform_plan(model) -> Plan:
    """First MoE layer keeps 6 experts, the others 4 (a single MoE layer keeps 6); balanced across two groups."""
    adapter = get_adapter(model)
    keeps = [[0, 1, 2, 4, 5, 6]] + [[1, 3, 5, 7]] * (len(adapter.moe_layer_indices(model)) - 1)
    return _keep_plan(model, adapter, dict(zip(adapter.moe_layer_indices(model), keeps)))


def _one_group(model_type: str) -> dict:
    """Overrides that make group-limited routing use a single group (any kept subset is then valid)."""
    config = tiny_config(model_type)
    adapter = get_adapter(config)
    if adapter.group_keys is None:
        return {}
    text = config.get_text_config()
    return {text.attribute_map.get(key, key): 1 for key in adapter.group_keys}


def _logits(model, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs).logits


def _ratio_zero(model_type: str, result: BatteryResult, root: Path) -> None:
    model = tiny_model(model_type)
    inputs = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    before = _logits(model, inputs)
    outcome = compress(model, method="reap", ratio=0.0, budget="layer", calib=token_batches(), cache_dir=False)
    assert outcome.plan.is_identity(), "ratio 0 must keep every expert"
    assert torch.equal(_logits(model, inputs), before), "ratio 0 changed the logits"


def _unused_experts(model_type: str, result: BatteryResult, root: Path) -> None:
    model = tiny_model(model_type, **_one_group(model_type))
    adapter = get_adapter(model)
    inputs = torch.randint(3, VOCAB, (1, 3), generator=torch.Generator().manual_seed(3))
    used = selected_experts(model, adapter, inputs)
    keep = {layer: sorted(experts) for layer, experts in used.items()}
    assert any(len(k) < adapter.num_experts(adapter.moe_block(adapter.decoder_layers(model)[i])) for i, k in keep.items())
    before = _logits(model, inputs)
    prune_experts(model, _keep_plan(model, adapter, keep), adapter)
    if adapter.gates_depend_only_on_chosen(model.config):
        torch.testing.assert_close(_logits(model, inputs), before, rtol=0, atol=1e-5)
    elif not adapter.gates_use_softmax_bias:
        # A plain softmax over fewer experts keeps the order of the kept ones, so the first MoE
        # layer chooses the same experts; its gates grow, so later layers see other inputs.
        first = adapter.moe_layer_indices(model)[0]
        chosen = selected_experts(model, adapter, inputs)[first]
        assert {keep[first][i] for i in chosen} == set(keep[first]), "softmax routing chose other experts"


def _saved(model, name: str, result: BatteryResult, root: Path, remote: bool, inputs: torch.Tensor) -> None:
    path = root / f"{result.model_type}-{name}"
    save_expected(path, inputs, model)
    result.jobs.append({"path": str(path), "remote": remote, "auto": auto_model_class(model.config).__name__, "case": name})


def _reload_cases(model_type: str, result: BatteryResult, root: Path) -> None:
    inputs = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    uniform = tiny_model(model_type)
    compress(uniform, method="reap", ratio=0.5, budget="layer", calib=token_batches(), out=root / f"{model_type}-uniform", cache_dir=False)
    assert not hasattr(uniform.config, "moe_compress"), "a uniform prune must be a stock checkpoint"
    _saved(uniform, "uniform", result, root, False, inputs)
    for layers in range(LAYERS, LAYERS + 3):  # per-layer counts need two MoE layers; some tiny stacks have one
        non_uniform = tiny_model(model_type, num_layers=layers)
        if len(get_adapter(non_uniform).moe_layer_indices(non_uniform)) > 1:
            break
    compress(non_uniform, plan=non_uniform_plan(non_uniform), out=root / f"{model_type}-global", ignore_plan_identity=True)
    _saved(non_uniform, "global", result, root, True, inputs)
    novices = tiny_model(model_type)
    compress(novices, method="mone", ratio=0.5, budget="global", calib=token_batches(), out=root / f"{model_type}-mone", cache_dir=False)
    _saved(novices, "mone", result, root, True, inputs)


def _block_drop(model_type: str, result: BatteryResult, root: Path) -> None:
    """Drop one whole block (the last one the config can still describe) and save a stock checkpoint."""
    inputs = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    for block in range(LAYERS, -1, -1):
        model = tiny_model(model_type, num_layers=LAYERS + 1)
        adapter = get_adapter(model)
        plan = Plan(model_type=adapter.model_type, top_k=adapter.top_k(model.config), layers=[], method="block-drop", num_layers=LAYERS + 1, dropped_blocks=[block])
        try:
            apply_plan(model, plan, adapter)
            break
        except MoECompressError as refused:  # a pattern the config cannot express: another block must do
            last = refused
    else:
        raise AssertionError(f"no single block can be dropped: {last}")
    assert model.config.get_text_config().num_hidden_layers == LAYERS and not hasattr(model.config, "moe_compress")
    save_compressed(model, root / f"{model_type}-block")
    _saved(model, "block", result, root, False, inputs)


def _slim(model_type: str, result: BatteryResult, root: Path) -> None:
    model = tiny_model(model_type)
    outcome = slim(model, "wanda", sparsity=0.5, calib=token_batches(2))
    assert outcome.summary["reached"]["experts"]["sparsity"] > 0.4
    assert torch.isfinite(_logits(model, torch.randint(3, VOCAB, (1, 6)))).all()


#: Config keys of expert widths, set to 64 for quantize: the tiny models' 16-24 leave 4-bit groups of
#: 16 whose scales cost what real models' groups of 128 do not (0.31x instead of about 0.27x).
EXPERT_WIDTHS = ("intermediate_size", "moe_intermediate_size", "expert_ffn_hidden_size", "moe_hidden_size")
_PACKED = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def _packed_bytes(path: Path) -> int:
    """Bytes of the packed tensors in a checkpoint's shards (their safetensors headers)."""
    total = 0
    for shard in path.glob("*.safetensors"):
        with open(shard, "rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k.rpartition(".")[2] in _PACKED)
    return total


def _quantize(model_type: str, result: BatteryResult, root: Path) -> None:
    """4-bit experts: the bf16 model's packed experts take <= 0.3x their bf16 bytes; the float32 model's checkpoint
    reloads (fresh process, `reload` jobs) to the in-memory quantised model's tensors and logits."""
    text = tiny_config(model_type).get_text_config().to_dict()
    model = tiny_model(model_type, **{key: 64 for key in EXPERT_WIDTHS if isinstance(text.get(key), int)})
    problem = unloadable_when_packed(model)
    if problem:
        try:
            quantize(model, root / f"{model_type}-quantize", bits=4, scope="experts")
        except MoECompressError as refused:
            result.quantized = {"refused": str(refused)}
            return
        raise AssertionError(f"quantize wrote a checkpoint transformers cannot load: {problem}")
    half = copy.deepcopy(model).to(torch.bfloat16)
    small = quantize(half, root / f"{model_type}-quantize-bf16", bits=4, scope="experts").summary
    result.quantized = {
        "experts_storage": small["experts_storage"],
        "ratio": _packed_bytes(root / f"{model_type}-quantize-bf16") / (2 * small["quantized_params"]),
    }
    outcome = quantize(model, root / f"{model_type}-quantize", bits=4, scope="experts")
    round_experts(model, 4, outcome.summary["group_size"])
    inputs = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    _saved(model, "quantize", result, root, outcome.summary["experts_storage"] == PER_EXPERT_STORAGE, inputs)


def _walk_reproduces_the_model(model) -> None:
    """The layer-by-layer observer reproduces the model's own last-layer output (hybrid layers, layer state)."""
    adapter = get_adapter(model)
    batches = token_batches(count=2)
    seen: list[torch.Tensor] = []
    last = adapter.decoder_layers(model)[-1]
    handle = last.register_forward_hook(lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    outputs = run_sequential(model, adapter, batches)
    for mine, reference in zip(outputs, seen, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-5)


def _sequential(model_type: str, result: BatteryResult, root: Path) -> None:
    _walk_reproduces_the_model(tiny_model(model_type))


def _defaults(model_type: str, result: BatteryResult, root: Path) -> None:
    """The config class's own features, only sizes shrunk (Gemma 4's per-layer inputs, tied embeddings,
    no dense first layer...): the walk reproduces the model, and a uniform prune saves a stock checkpoint."""
    model = tiny_model(model_type, from_defaults=True)
    _walk_reproduces_the_model(model)
    inputs = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    compress(model, method="reap", ratio=0.5, budget="layer", calib=token_batches(), out=root / f"{model_type}-defaults", cache_dir=False)
    assert not hasattr(model.config, "moe_compress"), "a uniform prune must be a stock checkpoint"
    _saved(model, "defaults", result, root, False, inputs)


CASES = {
    "sequential": _sequential,
    "ratio_zero": _ratio_zero,
    "unused_experts": _unused_experts,
    "reload": _reload_cases,
    "block_drop": _block_drop,
    "slim": _slim,
    "quantize": _quantize,
    "defaults": _defaults,
}


def run_battery(model_type: str, root: Path, cases: tuple[str, ...] = tuple(CASES)) -> BatteryResult:
    result = BatteryResult(model_type)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TextOnlyCalibrationWarning)  # asserted on its own in test_families
        for case in cases:
            try:
                CASES[case](model_type, result, root)
                result.outcomes[case] = "ok"
            except Exception as error:  # recorded per case and asserted by the tests
                result.outcomes[case] = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=-4)}"
    result.seconds = time.perf_counter() - start
    return result


@dataclass
class Battery:
    results: dict[str, BatteryResult]
    reloads: dict[str, dict]  # checkpoint path -> what the fresh process found
    seconds: float


@pytest.fixture(scope="session")
def battery(tmp_path_factory) -> Battery:
    """Every supported model type through every case; all reloads in one fresh process.

    Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread
    pool costs up to 20x; one thread keeps the battery to a few minutes.
    """
    root = tmp_path_factory.mktemp("battery")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        results = {model_type: run_battery(model_type, root) for model_type in SUPPORTED}
        reloads = load_in_fresh_process([job for result in results.values() for job in result.jobs])
    finally:
        torch.set_num_threads(threads)
    return Battery(results, reloads, time.perf_counter() - start)
