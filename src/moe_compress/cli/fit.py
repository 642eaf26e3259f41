"""`moe-compress fit`: the best compression of a model that fits a memory budget."""

from ..fitting.command import FitSettings
from .options import Calibration, DryRunOpt, Loading, ModelArg, OverwriteOpt, command, settings_options

Options = settings_options(FitSettings)


@command(exclude=("max_activation_memory", "offload_dir", "text_field"))
def fit(
    model: ModelArg,
    given: Options = Options(),
    calibration: Calibration = Calibration(),
    overwrite: OverwriteOpt = False,
    load: Loading = Loading(),
    dry_run: DryRunOpt = False,
) -> None:
    """Search expert counts per layer and bit widths per layer for the least KL to the original within a budget, and write the best.

    One calibration pass scores every candidate with layer-local proxies; a knapsack solver
    allocates them under the budget; the optimum, its neighbours on the front and the single
    methods that fit (the criterion alone, 8-bit, 4-bit) are measured end to end on held-out text,
    and the least KL is written with its report.
    """
    from ..fitting.command import fit_command

    return fit_command(model, given, calibration, load, overwrite, dry_run)
