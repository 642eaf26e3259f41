"""fitting.memory: byte sizes as people write them, and the cache a model holds at a context, checked
against the cache transformers itself fills in a forward pass."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

from moe_compress import MoECompressError
from moe_compress.session import byte_size
from moe_compress.fitting.memory import CacheKind, cache_breakdown, kv_cache_bytes, main, parse_bytes
from moe_compress.source.load import BUNDLED_MODELS
from tiny_models import SUPPORTED, tiny_model


@pytest.mark.parametrize("value, expected", [
    ("20GB", 20 * 10**9), ("20GiB", 20 * 2**30), ("1.5T", 1_500_000_000_000), ("512MB", 512 * 10**6), ("4Gi", 4 * 2**30),
    ("2.5", int(2.5 * 2**30)), (" 7 kib ", 7 * 1024), (4096, 4096), ("100b", 100),
])
def test_parse_bytes(value, expected):
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("value, message", [
    ("lots", r"cannot read --memory 'lots' as a size"), ("20XB", r"cannot read --memory '20XB'"), ("", r"cannot read --memory ''"),
    ("-1GB", r"--memory must be more than 0 bytes; got '-1GB'"), ("0", r"--memory must be more than 0 bytes; got '0'"),
    (0, r"more than 0 bytes; got 0"), (-5, r"more than 0 bytes; got -5"), (True, r"must be a size such as 20GB"),
    (None, r"must be a size such as 20GB"), (2.5, r"must be a size such as 20GB"),
])
def test_parse_bytes_refuses(value, message):
    with pytest.raises(MoECompressError, match=message) as caught:
        parse_bytes(value, "--memory")
    assert "\n" not in str(caught.value)


def test_parse_bytes_zero_where_allowed():
    assert parse_bytes("0", allow_zero=True) == 0


def test_cli_sizes_read_as_before():
    """--max-activation-memory keeps its meaning (a plain number is GiB, 0 is a budget) through parse_bytes."""
    assert [byte_size(v, "--max-activation-memory") for v in (None, "2.5", "4GiB", "500MB", "0")] == [None, int(2.5 * 2**30), 4 * 2**30, 500 * 10**6, 0]


def _filled_cache_bytes(cache) -> int:
    """Bytes of every tensor a transformers cache holds: K/V, MLA latents, indexer keys, conv and recurrent states."""
    tensors = {}
    for layer in cache.layers:
        for name in ("keys", "values", "indexer_keys"):
            value = getattr(layer, name, None)
            if isinstance(value, torch.Tensor):
                tensors[id(value)] = value
        for name in ("conv_states", "recurrent_states"):
            tensors.update({id(v): v for v in (getattr(layer, name, None) or {}).values() if isinstance(v, torch.Tensor)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


#: Supported families whose cache layout fitting.memory refuses (per-family quirks not in its formulas).
REFUSED = {"bailing_hybrid", "dots3_note", "dots3_note_text", "glm5_next", "hy_v4", "inkling_mm_model", "inkling_text", "kimi_linear",
           "mimo_v2_flash", "minimax", "qwen4_exp", "qwen4_exp_text", "unlimited_ocr"}


@pytest.mark.parametrize("family", sorted(SUPPORTED))
def test_cache_matches_what_transformers_fills(family):
    """Every supported family: GQA, sliding windows, MLA latents, DSA indexer keys, gated-delta-net /
    Mamba-1 / Mamba-2 / short-conv states. The formula from the config equals the bytes of the cache a
    forward pass fills (float32 tiny models; transformers' dynamic sliding cache keeps window - 1
    tokens, one less than counted), or the family is refused by name -- never a wrong number."""
    model = tiny_model(family)
    if family in REFUSED:
        with pytest.raises(MoECompressError, match=rf"^{model.config.get_text_config().model_type}: ") as caught:
            kv_cache_bytes(model.config, 10, dtype_bytes=4)
        assert "\n" not in str(caught.value)
        return
    for context, batch in ((3, 1), (10, 2)):
        with torch.no_grad():
            out = model(torch.randint(3, 90, (batch, context), generator=torch.Generator().manual_seed(0)), use_cache=True)
        kinds = {kind.kind: kind for kind in cache_breakdown(model.config, context, batch, dtype_bytes=4)}
        predicted = sum(kind.bytes for kind in kinds.values())
        sliding = kinds.get("sliding_attention")
        if sliding is not None and context >= (window := model.config.get_text_config().sliding_window):  # one token per sliding layer and sequence fewer in transformers
            predicted -= sliding.layers * sliding.per_layer // window
        assert _filled_cache_bytes(out.past_key_values) == predicted, (family, context, batch, kinds)


def _bundled_config(name: str):
    return AutoConfig.for_model(**json.loads((BUNDLED_MODELS / name / "config.json").read_text()))


def test_bundled_models_by_hand():
    """ref-mixtral: 6 layers x 2 (K, V) x 2 KV heads x head_dim 32 x 2 bytes (bf16) per token;
    ref-deepseek (MLA): 6 layers x (kv_lora_rank 64 + qk_rope_head_dim 16) x 2 bytes per token."""
    assert kv_cache_bytes(_bundled_config("ref-mixtral"), 8192) == 6 * 2 * 2 * 32 * 2 * 8192
    assert kv_cache_bytes(_bundled_config("ref-mixtral"), 8192, batch=3, dtype_bytes=1) == 6 * 2 * 2 * 32 * 8192 * 3
    assert cache_breakdown(_bundled_config("ref-deepseek"), 1000) == [CacheKind("mla", 6, 80 * 2 * 1000)]


def test_multimodal_wrapper_counts_its_text_model():
    config = AutoConfig.for_model("qwen3_vl_moe")
    text = config.get_text_config()
    text.dtype = "bfloat16"
    expected = text.num_hidden_layers * 2 * text.num_key_value_heads * text.head_dim * 2 * 100
    assert kv_cache_bytes(config, 100) == expected


@pytest.mark.parametrize("model_type, message", [
    ("minimax", "fit does not know this model's KV cache layout yet"), ("llama4_text", "fit does not know this model's KV cache layout yet"),
])
def test_unknown_layouts_are_refused(model_type, message):
    config = AutoConfig.for_model(model_type)
    with pytest.raises(MoECompressError, match=rf"^{model_type}: {message}, so a memory budget with a context cannot be computed") as caught:
        kv_cache_bytes(config, 100, dtype_bytes=2)
    assert "\n" not in str(caught.value)


def test_unknown_layer_kind_of_a_checked_family_is_refused():
    config = AutoConfig.for_model("qwen3_moe", dtype="bfloat16", layer_types=["full_attention", "chunked_attention"], num_hidden_layers=2)
    with pytest.raises(MoECompressError, match=r"^qwen3_moe: I do not know the cache of its 'chunked_attention' layers"):
        kv_cache_bytes(config, 100)


def test_missing_dtype_and_bad_context_are_refused():
    config = AutoConfig.for_model("mixtral")
    with pytest.raises(MoECompressError, match=r"the config of mixtral names no dtype I know \(none\); pass the cache's element size"):
        kv_cache_bytes(config, 100)
    with pytest.raises(MoECompressError, match=r"context and batch must be more than 0; got context 0, batch 1"):
        kv_cache_bytes(config, 0, dtype_bytes=2)


def test_entry_point_refuses_in_one_line(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["ref-mixtral", "--context", "0"])
    assert caught.value.code == 2
    assert capsys.readouterr().err == "error: context and batch must be more than 0; got context 0, batch 1.\n"


def test_entry_point_prints_weights_and_cache(capsys):
    main(["ref-mixtral", "--context", "8192"])
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "weights: 25582464 bytes (24.4 MiB)",
        "full_attention: 6 layers x 2097152 bytes = 12582912 bytes",
        "total at context 8192 x batch 1: 38165376 bytes (36.4 MiB)",
    ]
