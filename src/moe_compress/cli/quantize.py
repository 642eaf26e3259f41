"""`moe-compress quantize`: 4- or 8-bit weights in a compressed-tensors checkpoint."""

from typing import Annotated

import typer

from ..stages.options import QuantizeOptions
from .options import stage_command


@stage_command(QuantizeOptions, out="Directory to write the quantised checkpoint to (compressed-tensors pack-quantized; written atomically).",
               omit=("symmetric", "expert_bits"), exclude=("text_field", "max_activation_memory", "offload_dir"))
def quantize(
    given,
    calibration,
    guard,
    asymmetric: Annotated[bool, typer.Option("--asymmetric", help="Per-group zero points (asymmetric ranges) instead of symmetric ones.")] = False,
    samples: Annotated[int, typer.Option(help="autoround: number of calibration sequences.")] = 64,
):
    """Quantise weights to 4 or 8 bits (round-to-nearest or AutoRound, per group) and save a compressed-tensors checkpoint.

    Run it last, after prune/slim: it reads the full-precision model. Round-to-nearest streams
    a large checkpoint (one decoder layer read, quantised and written at a time); AutoRound
    holds the model in memory. The result loads with transformers (compressed-tensors
    installed) and vLLM; non-uniform checkpoints keep their generated remote code, and families
    that fuse experts on disk (gpt_oss, granitemoe, ...) get it: their experts are packed one
    weight per expert.
    """
    stage = given.stage(**({"symmetric": False} if asymmetric else {}))
    return stage, {"calib": calibration.spec(validate=given.method == "autoround" or not guard.no_guard)}  # read only by autoround and the guard
