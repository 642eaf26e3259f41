"""Every built-in stage's options, declared once: name, type, default and what it means.

A stage class takes its options from here (`class Prune(PruneOptions, Stage)`); the command
line builds each stage command's flags from the same fields (`cli.options.stage_options`), and
`moe-compress methods` lists them. This module imports nothing but pydantic, so the commands'
options exist without torch (`moe-compress --help` must not import it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from ..errors import param

Budget = Literal["layer", "global", "explicit"]
Unit = Literal["moe", "block"]
Mode = Literal["discrete", "consecutive"]
ConsecutiveScore = Literal["span", "framework"]


class PruneOptions(BaseModel):
    method: str = Field("reap", description=(
        "Method: frequency, soft_count, gate_sum, ean, reap, mone, cprune, cprune-cosine, or merging: hc-smoe, m-smoe, ream "
        "(see `moe-compress methods`)."))
    ratio: float = Field(0.25, description="Fraction of routed experts to remove, in [0, 1).")
    budget: Budget = Field("layer", description="layer: every MoE layer loses the same share; global: layers compete for one total.")
    min_keep: int = Field(0, description="Global budget only: fewest experts any layer may keep (never below top-k).")
    uniform: bool = Field(False, description=(
        "Global budget only: round the global plan to the same count in every MoE layer (its total shared equally; which experts "
        "by the same scores), a stock checkpoint serving engines load. The summary and card show both plans; with " f"{param('eval_ppl')} both are "
        "measured (perplexity, KL against the original; in memory this holds a copy of the original, streamed only the saved one is)."))
    keep: dict[int, int] | None = Field(None, description="With budget explicit: the experts each MoE layer keeps (decoder layer index -> count).")
    options: dict[str, Any] = Field({}, description="The method's own options (`moe-compress methods NAME` lists them); a recipe writes them beside the others.")


class DropOptions(BaseModel):
    unit: Unit = Field("moe", description="moe: drop MoE sub-layers (attention stays); block: drop whole decoder layers.")
    n: int | None = Field(None, description="How many sub-layers or blocks to drop.")
    layers: list[int] | str | None = Field(None, description=(
        f"Instead of {param('n')}: exactly these MoE sub-layers, or with {param('unit')} block these blocks (decoder layer indices, "
        "comma-separated), nothing calibrated."))
    target_ratio: float | None = Field(None, description=f"Instead of {param('n')}: fraction of all parameters to remove, in (0, 1).")
    mode: Mode = Field("discrete", description="block only: discrete (most similar single blocks) or consecutive (best run).")
    consecutive_score: ConsecutiveScore = Field("span", description=(
        "consecutive only: span scores a run of n blocks by cos(h_i, h_i+n); framework by cos(h_i, h_i+n+1), as the unified framework's code."))


class CondenseOptions(BaseModel):
    layers: int = Field(1, description="How many MoE layers to condense (at least one must keep routing).")
    experts: int | None = Field(None, description=(
        "Routed experts each condensed layer keeps, K (default: top-k, as the authors' 6 for DeepSeekMoE-16B); 0 keeps shared experts only (CD-MoE-S)."))
    objective: str = Field("layer_output", description=(
        "layer_output: the authors' JSD of the layer output, then of the final hidden state; next_token: JSD of the next-token "
        "distribution for both (moe-compress's earlier search)."))
    choose_size: bool = Field(False, description="Keep the prefix of 1..K experts with the lowest divergence instead of exactly K.")
    position_stride: int = Field(1, description="next_token objective: score every k-th position only.")
    cache_dir: str | Path | bool | None = Field(None, description="Where calibration statistics are cached (False: nowhere).")
    state_file: str | Path | bool | None = Field(None, description=(
        "Where the search saves its progress and resumes from (default: under the cache directory, keyed by model, data and settings)."))
    fresh: bool = Field(False, description="Discard a saved search state and search again.")


class FinetuneOptions(BaseModel):
    data: str = Field("bundled", description=f"Training text (same forms as {param('calib')}; 'bundled' uses its calib split).")
    steps: int = Field(200, description="Optimisation steps.")
    lr: float = Field(1e-5, description="Peak learning rate (the CD-MoE authors' 1e-5, decayed linearly).")
    batch_size: int = Field(8, description="Sequences per step.")
    seq_len: int = Field(256, description="Tokens per sequence.")
    seed: int = Field(0, description="Seed for batch sampling.")
    eval_data: str | None = Field("bundled", description="Held-out text for the before/after perplexity ('bundled': valid split).")
    eval_windows: int = Field(32, description=f"Held-out windows of {param('seq_len')} tokens the before/after perplexity reads.")
    weight_decay: float = Field(0.01, description="AdamW weight decay (torch's default, as the CD-MoE authors').")
    schedule: str = Field("linear", description="How the learning rate decays to zero over the steps: linear (the authors') or cosine.")


class SlimOptions(BaseModel):
    method: str = Field("wanda", description=(
        "wanda (|W|*||X||, per output row), sparsegpt (second-order with weight updates) or magnitude (|W|, no calibration)."))
    sparsity: float | None = Field(None, description="Fraction of each output row's weights to zero, in [0, 1). Default 0.5 unless " f"{param('nm')} is given.")
    nm: list[int] | str | None = Field(None, description=(
        f"Semi-structured N:M pattern instead of {param('sparsity')}, e.g. 2:4 or 4:8 (at most N nonzeros in every M consecutive input weights)."))
    targets: list[str] | str = Field(["experts"], description=(
        "Comma-separated weights to sparsify: experts (routed experts), shared (shared experts), attention."))
    blocksize: int = Field(128, description="sparsegpt: columns per lazy-update block (mask chosen per block).")
    damp: float = Field(0.01, description="sparsegpt: Hessian damping as a fraction of its mean diagonal.")
    propagate: bool = Field(True, description=(
        "Feed each layer the outputs of the already pruned layers (SparseGPT's sequential scheme) or of the original ones."))
    calibrate_all_experts: bool = Field(False, description=(
        "wanda/sparsegpt: route every calibration token to every routed expert while statistics are gathered (the model's output and "
        "routing stay its own), so no expert is pruned without data, as GPTQModel's routing override does; each expert's statistics "
        "then come from all tokens, not only its routed ones."))


class QuantizeOptions(BaseModel):
    bits: int = Field(4, description="Weight bits: 4 or 8 (weight-only; activations stay in the model dtype).")
    group_size: int | None = Field(None, description=(
        "Weights per scale along the input dimension; 0 = one scale per output row. Default: the largest of 128/64/32/16/8 dividing "
        "every quantised width."))
    scope: str = Field("all", description=(
        "all: every decoder Linear (attention, routed and shared experts, dense MLPs; routers, embeddings, lm_head stay); "
        "experts: routed experts only."))
    symmetric: bool = Field(True, description="Symmetric ranges; false: per-group zero points (asymmetric ranges).")
    method: str = Field("rtn", description=(
        "rtn: round-to-nearest, no data (fast); autoround: AutoRound's rounding tuned per decoder block on calibration text."))
    iters: int = Field(200, description="autoround: tuning steps per decoder block.")
    expert_bits: dict[int, int | dict[int, int]] | None = Field(None, description=(
        "Mixed precision (method rtn): decoder layer -> the width (4, 8, or 16 = as stored) of all its routed experts, or "
        "{expert: width}; experts not named take `bits` (`slimming.expert_bits`)."))
    calibrate_all_experts: bool = Field(False, description=(
        "autoround: tune each decoder block with every calibration token routed to every routed expert, all equally weighted, in "
        "the full-precision target and in the tuned block (moe-compress's variant; the next block's input and the saved routing "
        "stay the model's), so no expert keeps round-to-nearest for want of tokens; each expert is then tuned on all tokens, and "
        "the MoE blocks' tuning costs experts / top-k times the expert work."))
