"""`moe-compress drop`: layer drop / block drop."""

from ..stages.options import DropOptions
from .options import STAGE_PARTS, stage_command


@stage_command(DropOptions, "drop", flags={"n": "--drop"}, parts=(*STAGE_PARTS, "plan_out"), exclude=("batch_size", "text_field"), samples=128)
def drop(given):
    """Layer drop / block drop: remove the MoE sub-layers or blocks that change the residual stream least."""
    return given.stage()
