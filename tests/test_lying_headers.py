"""Checkpoints whose headers or bytes lie are refused (or warned about) with the tensor named, loaded whole or streamed."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import moe_compress as mc
from helpers import token_batches
from moe_compress import MoECompressError
from moe_compress.source.checkpoint import Checkpoint
from moe_compress.source.load import bundled_models, load_model, load_streamed, resolve_model
from tiny_checkpoints import FP8_CONFIG, edit_header, fp8_layout, rewrite_tensors, save_tiny_checkpoint, zero_fill
from tiny_models import tiny_model

EXPERT = "model.layers.1.block_sparse_moe.experts.3.w2.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny")


def _copy(tiny: Path, tmp_path: Path, name: str = "model") -> Path:
    return shutil.copytree(tiny, tmp_path / name)


def _read_everything(source: Path, streaming: bool) -> None:
    """Open `source` the way a stage does and read every tensor of it (streamed: layer by layer)."""
    if not streaming:
        load_model(source)
        return
    weights, _ = load_streamed(source)
    for name in weights.targets:
        with weights.loaded_names([name]):
            pass


def _set(key: str, value):
    def edit(header: dict) -> None:
        header[key].update(value)
    return edit


@pytest.mark.parametrize("streaming", [False, True])
def test_a_header_that_calls_float_bytes_integers_is_refused(tiny, tmp_path, streaming):
    """Same width, so safetensors accepts it; read as I32 the float32 bytes become ~1e9 integers."""
    source = _copy(tiny, tmp_path)
    edit_header(source / "model.safetensors", _set(EXPERT, {"dtype": "I32"}))
    with pytest.raises(MoECompressError, match=rf"checkpoint tensor {EXPERT} is stored as I32 in model\.safetensors, but "
                       r"model\.layers\.1\.mlp\.experts\.down_proj is a float32 parameter: the shard's header names the wrong dtype"):
        _read_everything(source, streaming)


def test_offsets_that_do_not_tile_the_data_name_the_tensor(tiny, tmp_path):
    source = _copy(tiny, tmp_path)
    norm, gate = "model.layers.0.input_layernorm.weight", "model.layers.0.block_sparse_moe.gate.weight"

    def swap(header: dict) -> None:
        header[norm]["data_offsets"], header[gate]["data_offsets"] = header[gate]["data_offsets"], header[norm]["data_offsets"]

    edit_header(source / "model.safetensors", swap)
    with pytest.raises(MoECompressError, match=rf"model\.safetensors is corrupt .*; tensor {norm} spans 1024 bytes, but F32 \[32\] needs 128: "
                       "its offsets are wrong or swapped"):
        Checkpoint(source)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_zero_filled_shard_is_refused(tiny, tmp_path, streaming):
    source = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny).save_pretrained(source, max_shard_size="100KB")
    shards = sorted(source.glob("model-*.safetensors"))
    assert len(shards) == 3
    zero_fill(shards[1])
    with pytest.raises(MoECompressError, match=rf"checkpoint shard {shards[1].name} is zero-filled: every tensor read from it is all zeros"):
        _read_everything(source, streaming)


@pytest.mark.parametrize("streaming", [False, True])
def test_an_all_zero_weight_matrix_is_warned_about_by_name(tiny, tmp_path, capsys, streaming):
    def zero_expert(tensors):
        tensors[EXPERT] = torch.zeros_like(tensors[EXPERT])
        return tensors

    source = rewrite_tensors(_copy(tiny, tmp_path), zero_expert)
    _read_everything(source, streaming)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    named = rf"checkpoint tensor {EXPERT}" if streaming else r"weight model\.layers\.1\.mlp\.experts\.down_proj\[3\] of .*model"
    assert len(warnings) == 1 and re.match(rf"warning: {named} is all zeros, which a trained model's weights", warnings[0]), warnings


def test_a_zero_fp8_scale_is_warned_about_by_name(tiny, tmp_path, capsys):
    scale = f"{EXPERT}_scale_inv"

    def zero_scale(tensors):
        tensors = fp8_layout(tensors)
        tensors[scale] = torch.zeros_like(tensors[scale])
        return tensors

    source = rewrite_tensors(_copy(tiny, tmp_path), zero_scale, quantization_config=FP8_CONFIG)
    _read_everything(source, streaming=True)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: checkpoint tensor {scale} is all zeros, which a trained model's weights and scales never are: model.safetensors "
        "may be damaged; re-download it if the output looks wrong (further all-zero tensors of it are not listed)."
    ]


@pytest.fixture(scope="module")
def mone_output(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mone") / "mone"
    mc.compress(tiny_model("mixtral"), "mone", 0.5, "layer", token_batches(), out=out, cache_dir=False)
    return out


@pytest.mark.parametrize("streaming", [False, True])
def test_a_1e38_novice_vector_is_refused(mone_output, tmp_path, streaming):
    key = "model.layers.0.block_sparse_moe.experts.novice_vectors"

    def poison(tensors):
        tensors[key][0, 0] = 1e38
        return tensors

    source = rewrite_tensors(shutil.copytree(mone_output, tmp_path / "mone"), poison)
    named = f"checkpoint tensor {key}" if streaming else r"weight model\.layers\.0\.mlp\.experts\.novice_vectors of .*mone"
    with pytest.raises(MoECompressError, match=rf"{named} holds values up to 1e\+38, far beyond any trained weight \(\|w\| <= 10000\)"):
        _read_everything(source, streaming)


FP8_EXPERT = "model.layers.1.block_sparse_moe.experts.3.w1.weight"
FP8_CASES = {
    "missing": (lambda t: t.pop(f"{FP8_EXPERT}_scale_inv"),
                rf"FP8 weight {FP8_EXPERT} has no scale {FP8_EXPERT}_scale_inv, so it cannot be dequantised"),
    "mis-shaped": (lambda t: t.update({f"{FP8_EXPERT}_scale_inv": torch.ones(2, 3)}),
                   rf"FP8 weight {FP8_EXPERT} \[16, 32\] has scale {FP8_EXPERT}_scale_inv of shape \[2, 3\], but weight_block_size "
                   r"\[128, 128\] needs \[1, 1\]"),
    "all missing": (lambda t: [t.pop(k) for k in [k for k in t if k.endswith("_scale_inv")]],
                    r"FP8 weight model\.layers\.0\.block_sparse_moe\.experts\.0\.w1\.weight has no scale .*_scale_inv \(nor do 83 other FP8 weights\)"),
}


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("case", list(FP8_CASES))
def test_fp8_scales_missing_or_mis_shaped_are_one_line_naming_the_weight(tiny, tmp_path, case, streaming):
    damage, message = FP8_CASES[case]

    def convert(tensors):
        tensors = fp8_layout(tensors)
        damage(tensors)
        return tensors

    source = rewrite_tensors(_copy(tiny, tmp_path), convert, quantization_config=FP8_CONFIG)
    with pytest.raises(MoECompressError, match=message) as refused:
        _read_everything(source, streaming)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("name", bundled_models())
def test_the_reference_models_pass_every_check(name, capsys):
    """Read whole through every check, the bundled models trip none (their largest |value| is 1.7, a final norm)."""
    _read_everything(Path(resolve_model(name)), streaming=True)
    load_model(name)
    assert "warning" not in capsys.readouterr().err


def test_each_tensor_is_checked_on_its_first_read_only(tiny, monkeypatch):
    """The checks ride on reads a run makes anyway, once per tensor: a layer read again (the writer's pass) costs nothing more."""
    from moe_compress.source import checkpoint as checkpoint_module

    checked = []
    real = checkpoint_module.check_read
    monkeypatch.setattr(checkpoint_module, "check_read", lambda tensor, what: checked.append(what) or real(tensor, what))
    weights, _ = load_streamed(tiny)
    name = "model.layers.1.mlp.experts.down_proj"
    for _ in range(2):
        with weights.loaded_names([name]):
            pass
    assert sorted(checked) == sorted(f"checkpoint tensor {key}" for key in weights.targets[name])
    assert len(checked) == 8
