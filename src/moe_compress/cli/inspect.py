"""`moe-compress inspect`: a model's MoE structure, parameters and bytes."""

import json
from pathlib import Path
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
    from ..report.tables import structure_tables
    from ..source.header_report import structure_from_headers

    # Without torch where the family's key layout is known (`source.header_report`); else with the
    # modelling code, which then learns the layout for the next checkpoint of the family.
    report = None if load.verify_checksums else structure_from_headers(model, load.dtype)
    if report is None:
        report = _with_modelling_code(model, load)
    if as_json:
        results.print_json(json.dumps(report, default=str))
        return
    show(structure_tables(report))


def _with_modelling_code(model: str, load: Loading) -> dict:
    from ..arch import get_adapter
    from ..arch.size import structure_report
    from ..source.key_layout import keep_layout, learn_layout
    from ..source.load import resolve_model

    load.check(model)
    source = resolve_model(model)
    loaded, _, _ = load.open(model, "cpu", streaming=Path(source).is_dir())
    report = structure_report(model, loaded, get_adapter(loaded))
    layout = learn_layout(source, loaded.config) if Path(source).is_dir() else None
    if layout is not None:
        keep_layout(layout)
    return report
