"""The `moe-compress` command line: thin wrappers over the Python API."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from .errors import MoECompressError

app = typer.Typer(
    help="Compress Mixture-of-Experts language models and save checkpoints that load anywhere.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out_console = Console()


def user_errors(command: Callable) -> Callable:
    """Print user errors as one clear line and exit 2, instead of a traceback."""

    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except MoECompressError as exc:
            console.print(f"[bold red]error:[/] {exc}")
            raise typer.Exit(2) from None

    return wrapper


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g}P{unit}"


def _bytes(n: float) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.4g} {suffix}"
        n /= 1024
    return f"{n:.4g} PiB"


ModelArg = Annotated[str, typer.Argument(help="Checkpoint directory, bundled model name (ref-mixtral, ref-deepseek) or Hub id.")]
DtypeOpt = Annotated[str, typer.Option(help="Weights dtype in memory: auto (as saved), float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str, typer.Option(help="Device for computation (cpu, cuda, cuda:1). Layers visit it one at a time while calibrating.")]


@app.command()
@user_errors
def inspect(
    model: ModelArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print the structure as JSON instead of tables.")] = False,
    dtype: DtypeOpt = "auto",
) -> None:
    """Print a model's MoE structure: layers, experts per layer, top-k, shared experts, parameters and bytes."""
    from .arch import get_adapter
    from .evaluate.size import model_size
    from .io.load import load_model

    loaded, _ = load_model(model, dtype=dtype)
    adapter = get_adapter(loaded)
    size = model_size(loaded, adapter)
    layers = adapter.decoder_layers(loaded)
    rows = []
    for index, layer in enumerate(layers):
        block = adapter.moe_block(layer)
        shared = len(adapter.shared_experts(block)) if block is not None else 0
        rows.append({"layer": index, "kind": "moe" if block is not None else "dense", "experts": size.experts_per_layer.get(index, 0), "shared_modules": shared})
    report = {"model": model, "model_type": adapter.model_type, "top_k": size.top_k, "dtype": str(loaded.dtype), "layers": rows, "size": size.to_dict()}
    if as_json:
        out_console.print_json(json.dumps(report, default=str))
        return
    table = Table(title=f"{model} ({adapter.model_type}), top-k {size.top_k}, {len(layers)} layers")
    for column in ("layer", "kind", "routed experts", "shared-expert modules"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["layer"]), row["kind"], str(row["experts"] or "-"), str(row["shared_modules"] or "-"))
    out_console.print(table)
    params = Table(title="parameters")
    params.add_column("part")
    params.add_column("count", justify="right")
    params.add_column("share", justify="right")
    for part in ("attention", "routed_experts", "shared_experts", "router", "other"):
        value = getattr(size, part)
        params.add_row(part.replace("_", " "), f"{value:,}", f"{100 * value / size.total:.1f}%")
    params.add_row("total", f"{size.total:,}", "100%")
    params.add_row("active per token", f"{size.active_per_token:,}", f"{100 * size.active_per_token / size.total:.1f}%")
    params.add_row("bytes in memory", _bytes(size.bytes), "")
    out_console.print(params)


@app.command()
@user_errors
def prune(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory to write the pruned checkpoint to (written atomically).")],
    method: Annotated[str, typer.Option(help="Importance criterion: frequency, soft_count, gate_sum, ean or reap.")] = "reap",
    ratio: Annotated[float, typer.Option(help="Fraction of routed experts to remove, in [0, 1).")] = 0.25,
    budget: Annotated[str, typer.Option(help="layer: every MoE layer loses the same share; global: layers compete for one total.")] = "layer",
    calib: Annotated[str, typer.Option(help="Calibration text: a file (.txt/.jsonl/.parquet), a directory, 'bundled[:domain]' or 'hf:<dataset>'.")] = "bundled",
    samples: Annotated[int, typer.Option(help="Number of calibration sequences.")] = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed that picks the calibration sequences.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 8,
    text_field: Annotated[str, typer.Option(help="Field/column holding the text in .jsonl/.parquet/datasets.")] = "text",
    min_keep: Annotated[int, typer.Option(help="Global budget only: fewest experts any layer may keep (never below top-k).")] = 0,
    plan_in: Annotated[Path | None, typer.Option(help="Apply this plan JSON instead of deciding from calibration.")] = None,
    plan_out: Annotated[Path | None, typer.Option(help="Also write the plan JSON here (it is always saved in --out).")] = None,
    eval_ppl: Annotated[str | None, typer.Option("--eval", help="Measure perplexity on this text before and after pruning (same forms as --calib; 'bundled' uses the test split).")] = None,
    eval_windows: Annotated[int, typer.Option(help="At most this many windows of --seq-len tokens for --eval.")] = 64,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it already exists.")] = False,
    cache_dir: Annotated[Path | None, typer.Option(help="Where calibration statistics are cached (default ~/.cache/moe_compress).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the statistics cache.")] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
) -> None:
    """Prune routed experts by an importance criterion (or a saved plan) and save the result."""
    from .api import compress
    from .data.batches import CalibrationSpec
    from .evaluate.perplexity import perplexity
    from .io.load import load_model
    from .io.save import check_output_dir
    from .methods.budget import check_ratio

    if plan_in is None:
        check_ratio(ratio)
    check_output_dir(out, overwrite)
    loaded, tokenizer = load_model(model, dtype=dtype, device=device)
    eval_windows_tensor = _eval_windows(tokenizer, eval_ppl, seq_len, eval_windows) if eval_ppl else None
    before = perplexity(loaded, eval_windows_tensor) if eval_windows_tensor is not None else None
    spec = CalibrationSpec(calib, samples, seq_len, seed, batch_size, text_field)
    result = compress(
        loaded, method, ratio, budget, spec, tokenizer, plan=plan_in, out=out, overwrite=overwrite,
        min_keep=min_keep, cache_dir=False if no_cache else cache_dir, device=device,
    )
    if plan_out is not None:
        result.plan.save(plan_out)
    out_console.print(result.plan.table())
    s = result.summary
    table = Table(title=f"pruned {model} -> {out}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    table.add_row("parameters", _human(s["params_before"]), _human(s["params_after"]), f"{100 * (s['params_after'] / s['params_before'] - 1):+.1f}%")
    table.add_row("active params/token", _human(s["active_params_before"]), _human(s["active_params_after"]), f"{100 * (s['active_params_after'] / s['active_params_before'] - 1):+.1f}%")
    table.add_row("bytes in memory", _bytes(s["bytes_before"]), _bytes(s["bytes_after"]), f"{100 * (s['bytes_after'] / s['bytes_before'] - 1):+.1f}%")
    if before is not None:
        after = perplexity(result.model, eval_windows_tensor)
        s["perplexity_before"], s["perplexity_after"] = before.perplexity, after.perplexity
        table.add_row(f"perplexity ({eval_ppl})", f"{before.perplexity:.3f}", f"{after.perplexity:.3f}", f"{100 * (after.perplexity / before.perplexity - 1):+.1f}%")
    out_console.print(table)
    cached = " (statistics from cache)" if s["statistics_from_cache"] else ""
    out_console.print(
        f"checkpoint: {_bytes(s['checkpoint_bytes'])} in {out}; time {s['seconds']:.1f}s{cached}; peak memory {_bytes(s['peak_rss_bytes'])}"
    )


def _eval_windows(tokenizer, source: str, seq_len: int, max_windows: int):
    from .data.batches import token_stream, windows
    from .data.texts import load_texts

    if tokenizer is None:
        raise MoECompressError("this checkpoint has no tokenizer, so text cannot be evaluated.")
    chunks = windows(token_stream(tokenizer, load_texts(source, split="test")), seq_len)
    if len(chunks) == 0:
        raise MoECompressError(f"evaluation text {source!r} is shorter than one window of {seq_len} tokens.")
    return chunks[:max_windows]


@app.command("eval")
@user_errors
def evaluate(
    model: ModelArg,
    ppl: Annotated[list[str], typer.Option(help="Text to measure perplexity on; repeatable. 'bundled' gives one result per bundled domain (test split).")],
    seq_len: Annotated[int, typer.Option(help="Tokens per non-overlapping window.")] = 256,
    max_windows: Annotated[int, typer.Option(help="At most this many windows per text source.")] = 256,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON to this file.")] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
) -> None:
    """Measure perplexity on held-out text (fixed-length, non-overlapping windows)."""
    from .data.texts import bundled_domains
    from .evaluate.perplexity import perplexity
    from .io.load import load_model

    loaded, tokenizer = load_model(model, dtype=dtype, device=device)
    sources = [source for s in ppl for source in ([f"bundled:{d}" for d in bundled_domains()] if s == "bundled" else [s])]
    results = {}
    table = Table(title=f"perplexity of {model}")
    for column in ("text", "perplexity", "nll/token", "tokens"):
        table.add_column(column, justify="right" if column != "text" else "left")
    for source in sources:
        r = perplexity(loaded, _eval_windows(tokenizer, source, seq_len, max_windows), batch_size)
        results[source] = r.to_dict()
        table.add_row(source, f"{r.perplexity:.3f}", f"{r.nll:.4f}", f"{r.tokens:,}")
    out_console.print(table)
    if json_out is not None:
        json_out.write_text(json.dumps({"model": model, "seq_len": seq_len, "perplexity": results}, indent=2) + "\n")


@app.command()
def methods() -> None:
    """List the registered expert-importance criteria."""
    from .methods.criteria import CRITERIA

    table = Table(title="expert pruning criteria")
    table.add_column("name")
    table.add_column("score")
    table.add_column("global budget compares")
    for c in CRITERIA.values():
        table.add_row(c.name, c.doc, "per-layer normalised scores" if c.normalise_globally else "raw scores")
    out_console.print(table)


def main() -> None:  # pragma: no cover - console entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(app())
