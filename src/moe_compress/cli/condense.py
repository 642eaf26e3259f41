"""`moe-compress condense`: CD-MoE."""

from typing import Annotated

import typer

from ..stages.options import CondenseOptions
from .options import STAGE_PARTS, stage_command


@stage_command(CondenseOptions, "condense", parts=(*STAGE_PARTS, "plan_out", "cache_dir"),
               exclude=("batch_size", "text_field", "streaming", "max_activation_memory", "offload_dir"))
def condense(given, samples: Annotated[int, typer.Option(help="Calibration sequences (the authors use 100).")] = 32):
    """CD-MoE: condense MoE layers into shared experts + a few constant-weight experts, chosen by output divergence.

    Memory: unlike prune, drop, slim and quantize, condense does not stream. Its search reruns
    every later layer for each candidate, so it holds the whole model plus every decoder
    layer's input for the calibration tokens (layers x samples x seq-len x hidden, in the model
    dtype); it refuses to start when that exceeds the available memory.
    """
    return given.stage()
