"""`moe-compress families`: the MoE model types of the installed transformers (read back without torch)."""

from typing import Annotated

import typer

from ..progress import results
from .options import command


@command()
def families(
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the table as markdown (the README's families section).")] = False,
) -> None:
    """List the MoE model types of the installed transformers: supported or not and why, router, shared experts,
    and which outputs load with plain from_pretrained (the others load with trust_remote_code)."""
    from ..arch.family_table import markdown as to_markdown
    from ..listings import family_rows
    from ..report.tables import family_table

    rows = family_rows()
    if markdown:
        print(to_markdown(rows), end="")
        return
    results.print(family_table(rows))
