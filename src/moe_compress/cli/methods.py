"""`moe-compress methods [NAME]`: every method and stage, or one method's options (read back without torch)."""

from typing import Annotated

import typer

from ..progress import show
from .options import command


@command()
def methods(
    name: Annotated[str | None, typer.Argument(help="A method: list its options (for prune --option KEY=VALUE) with their types, defaults and meanings.")] = None,
) -> None:
    """List every method and stage -- expert pruning and merging, drop, condense, fine-tuning,
    slimming, quantisation -- with its options and their defaults (also the recipe stage options)."""
    from ..listings import method_options, method_rows
    from ..report.tables import method_options_table, method_tables

    show([method_options_table(name, method_options(name))] if name else method_tables(method_rows()))
