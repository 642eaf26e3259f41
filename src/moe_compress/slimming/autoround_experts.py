"""AutoRound's block tuning with calibration routed to every expert (`quantize --method autoround --calibrate-all-experts`).

AutoRound tunes each decoder block by signed gradient descent so that its quantised output
matches the full-precision block's on the calibration tokens. An expert its router sends no
token adds nothing to that output, so it gets no gradient and keeps AutoRound's starting point,
round-to-nearest: it is rounded without data, and the quality guard names it.

Our variant (moe-compress's, not a feature of auto-round): while a block is tuned, its experts
module receives every token for every expert, each weighted alike -- an equal share of the
token's routed weights (`walk.all_experts.even_routing`) -- in the full-precision target and in
the block being tuned, so the objective compares like with like and every expert's output
enters it. What feeds the next block stays the model's own routing: the full-precision outputs
(AutoRound's reference input for the next block) and the tuned block's outputs are computed with
the router's top-k, as GPTQModel replays each layer with the native router. The saved model's
routing is untouched.

Why not what others do (read in their sources, not copied): auto-round 0.16.1's own switch
(AR_FORCE_MOE_ROUTING_ALL_EXPERTS) runs an extra forward with rotated routing under no_grad and
discards it -- it feeds statistics hooks, not the tuning's gradient. GPTQModel (top-k set to all
experts: the router's own weights over all of them) and llm-compressor (every expert run on
every token, only the routed ones in the output) serve methods whose statistics read an expert's
inputs alone (GPTQ's Hessian); for AutoRound the expert's output must enter the loss with a
weight, and the router's weight of an expert it never picks is near zero (it can underflow to
exactly zero), so it would still learn nothing. The price of equal weights: each expert's
rounding is tuned on every token rather than on those its router sends it, and every MoE
block's tuning computes each expert on every token (E / top-k times the expert work).

How: the AutoRound compressor's per-block pipeline (`AlgorithmComposer.compress_block`, which
computes the target, tunes, then computes the next block's input) and its tuning step
(`quantize_block`) are wrapped on the compressor instance we made; nothing global is changed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..arch.registry import get_adapter
from ..walk.all_experts import routed_evenly, routing_width


def experts_to_route(model: PreTrainedModel) -> dict[str, int]:
    """Every MoE block's experts module (its name in `model`) -> the experts its routing names.
    Read before AutoRound unfuses the experts (after that they have no fused tensor to count)."""
    adapter = get_adapter(model)
    names = {id(module): name for name, module in model.named_modules()}
    found = {}
    for layer in adapter.decoder_layers(model):
        block = adapter.moe_block(layer)
        if block is not None:
            experts = adapter.experts(block)
            found[names[id(experts)]] = routing_width(experts)
    return found


def tune_every_expert(runner: Any, model: nn.Module, experts: dict[str, int]) -> None:
    """Make the AutoRound compressor `runner` (of `model`, not yet run) tune each block with `experts` (`experts_to_route`)
    routed evenly, and pass on the block's outputs under the model's own routing (see the module docstring)."""
    runner.post_init()  # builds the composer (idempotent: quantize() calls it again)
    widths = {id(model.get_submodule(name)): width for name, width in experts.items()}
    composer = runner.alg_composer
    quantizer = composer.block_quantizer
    compress_block, quantize_block = composer.compress_block, quantizer.quantize_block

    def inside(block: nn.Module) -> list[tuple[nn.Module, int]]:
        return [(module, widths[id(module)]) for module in block.modules() if id(module) in widths]

    def tuned_evenly(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with routed_evenly(inside(block)):
            return quantize_block(block, *args, **kwargs)

    def block_evenly(block: nn.Module, fp_inputs: Any, input_others: dict, *args: Any, **kwargs: Any) -> tuple:
        routed = inside(block)
        if not routed or fp_inputs is None:
            return compress_block(block, fp_inputs, input_others, *args, **kwargs)
        forward = composer.block_forward
        with torch.no_grad():
            native = forward(block, fp_inputs, input_others)
            native = getattr(forward, "last_output_dict", None) or native
            with routed_evenly(routed):
                target = forward(block, fp_inputs, input_others)
        quantized, _ = compress_block(block, fp_inputs, input_others, *args, reference_output=target, **kwargs)
        return quantized, native

    quantizer.quantize_block = tuned_evenly
    composer.compress_block = block_evenly
