"""Every MoE model type of the installed transformers: discovered, run through the whole pipeline, or refused.

The battery (`family_battery.py`) runs each supported type's tiny model -- built from its real
config class -- through ratio 0, pruning unused experts, uniform / non-uniform / MoNE saves,
block drop, slim and quantize, its defaults build (every feature of the class on, only sizes
shrunk) through the layer walk and a uniform prune, and reloads every checkpoint in one fresh
process that cannot import moe_compress. The tests below turn its records into one failure per broken path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from family_battery import CASES, battery  # noqa: F401  (session fixture)
from helpers import assert_reloads_exactly
from moe_compress import MoECompressError, get_adapter
from moe_compress.arch import standard_moe_model_types
from moe_compress.arch.catalog import build_skeleton
from moe_compress.arch.families import OVERRIDES, REFUSED
from moe_compress.arch.registry import refusal
from moe_compress.arch.table import experts_stored_per_expert
from moe_compress.slimming.quantize import PER_EXPERT_STORAGE
from tiny_models import SUPPORTED, tiny_config, tiny_model

#: The families users ask for most (issue 12); each must be supported, not merely listed.
REQUESTED = (
    "qwen3_5_moe", "gemma4", "qwen3_next", "glm4_moe_lite", "glm_moe_dsa", "deepseek_v32", "minimax_m2", "kimi_linear",
    "mistral_large4", "qwen3_vl_moe", "glm4v_moe", "nemotron_h", "jamba", "granitemoehybrid", "qwen3_omni_moe_thinker",
)
RELOADED = {"uniform": False, "global": True, "mone": True, "block": False, "defaults": False}  # case -> needs remote code
#: The battery is one session fixture that runs every case of every type: its tests share one
#: pytest-xdist worker, or each worker would build the whole battery again.
ON_BATTERY_WORKER = pytest.mark.xdist_group("family-battery")


@ON_BATTERY_WORKER
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("model_type", SUPPORTED)
def test_battery(battery, model_type, case):  # noqa: F811
    outcome = battery.results[model_type].outcomes[case]
    assert outcome == "ok", outcome


@ON_BATTERY_WORKER
@pytest.mark.parametrize("model_type", SUPPORTED)
def test_saved_checkpoints_reload_exactly_without_moe_compress(battery, model_type):  # noqa: F811
    """Uniform prune (also of the defaults build) and block drop: stock class; non-uniform and MoNE: the generated class;
    identical tensors and logits."""
    jobs = {job["case"]: job for job in battery.results[model_type].jobs}
    assert set(RELOADED) <= set(jobs), f"cases that saved nothing: {set(RELOADED) - set(jobs)}"
    for case, remote in RELOADED.items():
        path = Path(jobs[case]["path"])
        config = json.loads((path / "config.json").read_text())
        if remote:
            assert config["model_type"] == f"moe_compress_{model_type}" and "moe_compress" in config
        else:
            assert config["model_type"] == model_type and "auto_map" not in config and not list(path.glob("*.py"))
        result = battery.reloads[str(path)]
        assert result["class"].startswith("MoECompress") == remote, (case, result["class"])
        assert_reloads_exactly(result)


#: transformers 5.23 loads no packed checkpoint of these: their weight conversion splits one stored weight into
#: several (inkling_mm_model's dense `mlp.w13_dn`, unlimited_ocr's `qkv_proj`), which it cannot do after dequantising.
QUANTIZE_REFUSED = {"inkling_mm_model", "unlimited_ocr"}


@ON_BATTERY_WORKER
@pytest.mark.parametrize("model_type", SUPPORTED)
def test_4bit_quantize_shrinks_the_experts_and_reloads_exactly(battery, model_type):  # noqa: F811
    """Packed experts take <= 0.3x their bf16 bytes on every family, and the checkpoint reloads without moe_compress to the
    in-memory quantised model's tensors and logits; families that fuse experts on disk store them one weight per expert
    and load through the generated `MoECompressPerExpert...` class."""
    quantized = battery.results[model_type].quantized
    if model_type in QUANTIZE_REFUSED:
        assert "would not load in transformers" in quantized["refused"]
        return
    assert "refused" not in quantized, quantized
    print(f"\n{model_type}: packed experts {quantized['ratio']:.4f}x their bf16 bytes")
    assert quantized["ratio"] <= 0.3
    skeleton = build_skeleton(tiny_config(model_type))
    fused = not experts_stored_per_expert(skeleton, get_adapter(skeleton))
    assert (quantized["experts_storage"] == PER_EXPERT_STORAGE) == fused
    job = next(job for job in battery.results[model_type].jobs if job["case"] == "quantize")
    assert job["remote"] == fused
    result = battery.reloads[job["path"]]
    assert result["class"].startswith("MoECompressPerExpert") == fused, result["class"]
    assert_reloads_exactly(result)


def test_the_requested_families_are_supported():
    assert set(REQUESTED) <= set(SUPPORTED)


def test_every_standard_experts_model_type_is_supported_or_refused_with_a_reason():
    types = standard_moe_model_types()
    assert len(types) >= 64, "transformers 5.23 ships about 64 families with its standard experts module"
    for model_type in types:
        assert (model_type in SUPPORTED) != bool(refusal(model_type)), model_type
    assert all(REFUSED.values()) and all(reason for _, reason in OVERRIDES.values())


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_discovery_is_the_same_on_weights_on_the_meta_device_and_from_the_config(model_type):
    """The streamed pipeline only ever has a meta skeleton (and the config) of the whole model."""
    config = tiny_config(model_type)
    on_weights = get_adapter(tiny_model(model_type))
    assert get_adapter(build_skeleton(config)) == on_weights
    assert get_adapter(config) == on_weights


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_refused_types_fail_with_their_model_type_and_reason(model_type):
    from moe_compress.arch.catalog import probe_config

    with pytest.raises(MoECompressError, match=re.escape(f"'{model_type}' is not supported: {REFUSED[model_type]}")):
        get_adapter(probe_config(model_type))


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_layer_drop_scores_every_family_or_says_why_not(model_type):
    """Scoring MoE sub-layers and blocks for dropping runs on every family (post-norm, hybrid and
    hyper-connection layers included): a plan, or a clear refusal -- never an error from inside."""
    from helpers import token_batches
    from moe_compress import MoECompressError, drop

    for unit in ("moe", "block"):
        try:
            plan = drop(tiny_model(model_type), unit=unit, n=1, calib=token_batches(1)).plan
        except MoECompressError:  # e.g. the tiny model's only MoE layer, or experts inside the decoder layer
            continue
        dropped = plan.dropped_blocks if unit == "block" else [lp.layer for lp in plan.layers if lp.action == "drop_moe"]
        assert len(dropped) == 1, (unit, dropped)
