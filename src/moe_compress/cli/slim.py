"""`moe-compress slim`: weight sparsity inside the experts (Wanda, SparseGPT, magnitude)."""

from ..stages.options import SlimOptions
from .options import STAGE_PARTS, stage_command


@stage_command(SlimOptions, out="Directory to write the sparsified checkpoint to (written atomically; same shapes, zeros where weights were removed).",
               parts=(*STAGE_PARTS, "evaluation"))
def slim(given):
    """Zero weights inside the experts with Wanda, SparseGPT or magnitude pruning (unstructured or N:M) and save the result."""
    return given.stage()
