"""`moe-compress inspect`: a model's MoE structure, parameters and bytes."""

import json
from typing import Annotated

import typer

from ..progress import results, show
from .options import Loading, ModelArg, command


@command(exclude=("device", "streaming", "threads", "max_activation_memory", "offload_dir"))
def inspect(
    model: ModelArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print the structure as JSON instead of tables.")] = False,
    load: Loading = Loading(),
) -> None:
    """Print a model's MoE structure: layers, experts per layer, top-k, shared experts, parameters and bytes.

    A local checkpoint is read from its config and shard headers alone (no weights are loaded).
    """
    from ..listings import structure_of
    from ..report.tables import structure_tables

    report = structure_of(model, load)
    if as_json:
        results.print_json(json.dumps(report, default=str))
        return
    show(structure_tables(report))
