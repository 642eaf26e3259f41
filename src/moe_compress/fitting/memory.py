"""The memory a budget counts besides the weights: the KV cache (or recurrent state) at a context.

A `--memory 20GB --context 8192` budget must leave room for what serving at that context holds
per sequence, and that depends on the attention layout alone, so it is computed from the config
(the text config of a multimodal wrapper), layer by layer:

* full attention (MHA / GQA): 2 (K and V) x num_key_value_heads x head_dim values per token;
  head_dim is the config's, else hidden_size / num_attention_heads (transformers' attention
  modules, e.g. `MixtralAttention`, and `DynamicLayer` in `cache_utils.py`);
* sliding-window attention (`sliding_window`, or `layer_types` "sliding_attention"): the same
  per token, for min(context, window) tokens (vLLM's and transformers' `StaticSlidingWindowLayer`;
  the dynamic cache keeps window - 1, one token less);
* MLA (a config with `kv_lora_rank`: DeepSeek-V2/V3, Kimi-K2, GLM-4.7-Flash ...): the compressed
  latent, kv_lora_rank + qk_rope_head_dim values per token, whatever the head count. vLLM caches
  that, and so does transformers 5.23: every MLA attention in it calls
  `past_key_values.update(kv_nope, k_rot)` on the single-head latents *before* `expand_kv`, so
  there is one layout, not an engine / transformers choice. DSA models (DeepSeek-V3.2, GLM-5,
  layer kind "indexed_attention") add their indexer's keys, index_head_dim values per token;
* recurrent layers hold a fixed state whatever the context (`LinearAttentionLayer`: a conv
  state of conv_dim x kernel values and a recurrent state), read from each family's mixer:
  qwen3_next and qwen3_5_moe gated delta nets (conv_dim = 2 key_dim + value_dim, state
  num_v_heads x k_dim x v_dim); jamba Mamba-1 (conv expand*hidden x d_conv, state expand*hidden
  x d_state); nemotron_h and granitemoehybrid Mamba-2 (conv_dim = inner + 2 n_groups d_state,
  state heads x head_dim x d_state); lfm2_moe short convolutions ("conv" layers: hidden_size x
  conv_L_cache, no recurrent state);
* layers without attention (nemotron_h "moe" / "mlp"): nothing.

Everything is counted at one element size: the config's dtype unless one is given (engines
often keep the cache in the model dtype; pass dtype_bytes for an fp8 cache). A layer kind
this table does not know, or a model type not in `CHECKED`, is refused with the model type named,
never guessed.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Any

from ..errors import MoECompressError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
          "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}
_DTYPE_BYTES = {"float64": 8, "float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2,
                "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1, "uint8": 1}
_RECURRENT = {"qwen3_next": "linear_attention", "qwen3_5_moe_text": "linear_attention", "jamba": "linear_attention",
              "nemotron_h": "linear_attention", "granitemoehybrid": "linear_attention", "lfm2_moe": "conv"}  # their recurrent layers' word
_NO_CACHE = {"moe", "mlp"}  # nemotron_h layers that hold no attention at all
#: (Text) model types whose cache these formulas were checked against transformers' own, byte for byte
#: (tests/test_fit_memory.py runs every supported family). Others -- per-family quirks such as
#: MiMo-V2-Flash's doubled sliding KV heads or Kimi-Linear's KDA state -- are refused, not guessed.
CHECKED = frozenset({
    "afmoe", "aria_text", "axk1", "axk2", "beam", "cohere2_moe", "deepseek_ocr2_text", "deepseek_v2", "deepseek_v3", "deepseek_v32",
    "dots1", "ernie4_5_moe", "exaone_moe", "flex_olmo", "flint", "gemma4_text", "glm4_moe", "glm4_moe_lite", "glm4v_moe_text",
    "glm_moe_dsa", "gpt_oss", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe", "hy_v3",
    "jamba", "kolibri1", "laguna", "lfm2_moe", "mellum", "minimax_m2", "minimax_m3_vl_text", "mistral4", "mistral_large4_text",
    "mixtral", "muse_spark_text", "nemotron_h", "olmoe", "phimoe", "qwen2_moe", "qwen3_5_moe_text", "qwen3_moe", "qwen3_next",
    "qwen3_omni_moe_text", "qwen3_vl_moe_text", "solar_open",
})


def parse_bytes(value: str | int, what: str = "size", allow_zero: bool = False, bare_unit: int = 2**30) -> int:
    """'20GB', '20GiB', '1.5T', '512MB', '4Gi' or an int -> bytes.

    Units read as Kubernetes reads them: K/M/G/T (with or without B) are powers of 1000 and
    Ki/Mi/Gi/Ti (with or without B) powers of 1024, so '20GB' and '20GiB' mean what they say.
    A bare number in a string is `bare_unit` bytes (GiB, as the CLI's memory options always
    read it); an int is bytes. Zero is refused unless `allow_zero` (a budget of nothing is a typo).
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise MoECompressError(f"{what} must be a size such as 20GB or 512MiB; got {value!r}.")
    if isinstance(value, int):
        amount = value
    else:
        match = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        unit = match.group(2).lower() if match else None
        if unit not in _UNITS:
            raise MoECompressError(f"cannot read {what} {value!r} as a size: use a number with a unit, e.g. 20GB, 20GiB or 512MB (a plain number means GiB).")
        amount = int(float(match.group(1)) * (_UNITS[unit] if unit else bare_unit))
    if amount < 0 or (amount == 0 and not allow_zero):
        raise MoECompressError(f"{what} must be {'>= 0' if allow_zero else 'more than 0'} bytes; got {value!r}.")
    return amount


@dataclass(frozen=True)
class CacheKind:
    """One kind of layer's share of the cache: how many layers, and their bytes together."""

    kind: str  # full_attention, sliding_attention, mla, recurrent, none
    layers: int
    per_layer: int  # bytes of one such layer at this context x batch

    @property
    def bytes(self) -> int:
        return self.layers * self.per_layer


def _get(config: Any, key: str, default: Any = None) -> Any:
    value = getattr(config, key, default)
    return default if value is None else value


def element_bytes(config: Any) -> int:
    """Bytes per element of the config's dtype (torch dtype or its name)."""
    name = str(_get(config, "dtype", "") or _get(config, "torch_dtype", "")).removeprefix("torch.")
    if name not in _DTYPE_BYTES:
        raise MoECompressError(f"the config of {_get(config, 'model_type', 'this model')} names no dtype I know ({name or 'none'}); pass the cache's element size (dtype_bytes).")
    return _DTYPE_BYTES[name]


def _layer_kinds(config: Any) -> list[str]:
    """Each decoder layer's kind: the config's `layer_types` (jamba and nemotron_h derive it), else
    every layer alike -- sliding when the config sets a window (Mixtral), full attention otherwise."""
    kinds = _get(config, "layer_types") or _get(config, "layers_block_type")
    if kinds:
        return list(kinds)
    return ["sliding_attention" if _get(config, "sliding_window") else "full_attention"] * int(config.num_hidden_layers)


def _attention_token_values(config: Any) -> tuple[str, int]:
    """(kind, values cached per token) of an attention layer: MLA's latent, or K and V of each KV head."""
    if _get(config, "kv_lora_rank"):
        return "mla", int(config.kv_lora_rank) + int(config.qk_rope_head_dim) + int(_get(config, "index_head_dim", 0))
    heads = int(config.num_attention_heads)
    kv_heads = int(_get(config, "num_key_value_heads", heads))
    head_dim = int(_get(config, "head_dim", config.hidden_size // heads))
    return "full_attention", 2 * kv_heads * head_dim


def _recurrent_values(config: Any, model_type: str) -> int:
    """Values of one recurrent layer's fixed state (conv state + recurrent state), per sequence."""
    if model_type in ("qwen3_next", "qwen3_5_moe_text"):  # Qwen3NextGatedDeltaNet, Qwen3_5MoeGatedDeltaNet
        key_dim = config.linear_key_head_dim * config.linear_num_key_heads
        value_dim = config.linear_value_head_dim * config.linear_num_value_heads
        conv = (2 * key_dim + value_dim) * config.linear_conv_kernel_dim
        return conv + config.linear_num_value_heads * config.linear_key_head_dim * config.linear_value_head_dim
    if model_type == "jamba":  # JambaMambaMixer (Mamba-1)
        inner = config.mamba_expand * config.hidden_size
        return inner * config.mamba_d_conv + inner * config.mamba_d_state
    if model_type == "nemotron_h":  # NemotronHMamba2Mixer
        inner = config.mamba_num_heads * config.mamba_head_dim
        conv = (inner + 2 * config.n_groups * config.ssm_state_size) * config.conv_kernel
        return conv + inner * config.ssm_state_size
    if model_type == "lfm2_moe":  # Lfm2MoeShortConv: a depthwise conv's last L_cache inputs
        return config.hidden_size * config.conv_L_cache
    # granitemoehybrid: GraniteMoeHybridMambaLayer (Mamba-2)
    inner = int(config.mamba_expand * config.hidden_size)
    conv = (inner + 2 * config.mamba_n_groups * config.mamba_d_state) * config.mamba_d_conv
    return conv + config.mamba_n_heads * config.mamba_d_head * config.mamba_d_state


def cache_breakdown(config: Any, context: int, batch: int = 1, dtype_bytes: int | None = None) -> list[CacheKind]:
    """The cache at `context` tokens x `batch` sequences, by layer kind (see the module docstring)."""
    if context <= 0 or batch <= 0:
        raise MoECompressError(f"context and batch must be more than 0; got context {context}, batch {batch}.")
    getter = getattr(config, "get_text_config", None)
    config = getter() if callable(getter) else config
    model_type = str(_get(config, "model_type", "unknown"))
    if model_type not in CHECKED:
        raise MoECompressError(f"{model_type}: fit does not know this model's KV cache layout yet, so a memory budget with a context cannot be computed; fit without --context.")
    element = dtype_bytes or element_bytes(config)
    window = int(_get(config, "sliding_window", 0)) or context
    per_kind: dict[str, list[int]] = {}
    for kind in _layer_kinds(config):
        if kind in ("full_attention", "sliding_attention", "indexed_attention"):
            name, values = _attention_token_values(config)
            if kind == "sliding_attention":
                name, size = kind, values * min(context, window)
            else:
                size = values * context
        elif kind == _RECURRENT.get(model_type):
            name, size = "recurrent", _recurrent_values(config, model_type)
        elif kind in _NO_CACHE and model_type == "nemotron_h":
            name, size = "none", 0
        else:
            raise MoECompressError(f"{model_type}: I do not know the cache of its {kind!r} layers, so a memory budget with a context cannot be computed; fit without --context.")
        entry = per_kind.setdefault(name, [0, size * element * batch])
        entry[0] += 1
    return [CacheKind(kind, count, per_layer) for kind, (count, per_layer) in per_kind.items()]


def kv_cache_bytes(config: Any, context: int, batch: int = 1, dtype_bytes: int | None = None) -> int:
    """Bytes of the KV cache (and recurrent state) at `context` tokens x `batch` sequences."""
    return sum(kind.bytes for kind in cache_breakdown(config, context, batch, dtype_bytes))


def main(argv: list[str] | None = None) -> None:
    """`python -m moe_compress.fitting.memory MODEL --context N [--batch B]`: weights + cache, as the README's example."""
    import argparse

    from ..source.checkpoint import Checkpoint
    from ..source.load import load_config
    from ..text.format import human_bytes

    parser = argparse.ArgumentParser(prog="python -m moe_compress.fitting.memory", description=main.__doc__)
    parser.add_argument("model")
    parser.add_argument("--context", type=int, required=True)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        source, config = load_config(args.model)
        weights = Checkpoint(source).total_bytes()
        kinds = cache_breakdown(config, args.context, args.batch)
    except MoECompressError as exc:  # one line and exit 2, as the CLI answers bad input
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"weights: {weights} bytes ({human_bytes(weights)})")
    for kind in kinds:
        print(f"{kind.kind}: {kind.layers} layers x {kind.per_layer} bytes = {kind.bytes} bytes")
    total = weights + sum(kind.bytes for kind in kinds)
    print(f"total at context {args.context} x batch {args.batch}: {total} bytes ({human_bytes(total)})")


if __name__ == "__main__":
    main()
