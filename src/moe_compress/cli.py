"""The `moe-compress` command line: thin wrappers over the Python API.

Top-level imports stay light (typer, rich): `moe-compress --help` must not import torch.
Each command imports what it needs when it runs.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from . import __version__, progress
from .errors import MoECompressError
from .evaluate.protocol import DEFAULT_PROTOCOL, EvalProtocol
from .report.format import human_bytes, human_count, percent_change

console = progress.messages  # stderr: progress, notes, warnings, errors; one error line stays one line when piped
out_console = progress.results  # stdout: results; never wrapped when not a terminal

#: Flags that set the verbosity; accepted before or after the command name.
_VERBOSITY_FLAGS = {"--quiet": "quiet", "-q": "quiet", "--verbose": "verbose", "-v": "verbose"}


def _error_line(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}")


def _verbosity_from(args: list[str]) -> tuple[list[str], progress.Verbosity | None]:
    """Take the verbosity flags out of `args` wherever they are (`moe-compress prune ... --quiet`
    reads as naturally as `moe-compress --quiet prune ...`); the last one given wins."""
    level = None
    rest = []
    for position, arg in enumerate(args):
        if arg == "--":  # everything after it is an argument, never a flag
            rest += args[position:]
            break
        if arg in _VERBOSITY_FLAGS:
            level = _VERBOSITY_FLAGS[arg]
        else:
            rest.append(arg)
    return rest, level


class _OneLineUsageErrors(TyperGroup):
    """A bad option value or a missing argument is a user error like any other: one
    `error:` line and exit 2, not click's usage box. Also sets the verbosity for the command,
    silences library noise unless verbose, and records the command line for model cards."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from .invocation import recording

        args, level = _verbosity_from(list(sys.argv[1:] if args is None else args))
        no_arguments = not args  # shows the help, as no_args_is_help says
        if not standalone_mode or no_arguments:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        previous = progress.set_verbosity(level) if level else None
        try:
            with progress.libraries_quiet(), recording(["moe-compress", *args]):
                result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # typer's click: bad values, unknown options, missing arguments
            where = getattr(exc, "ctx", None)
            _error_line(exc.format_message().rstrip(".") + (f"; see `{where.command_path} --help`." if where else "."))
            sys.exit(2)
        except typer.Abort:
            _error_line("aborted.")
            sys.exit(1)
        finally:
            if level:
                progress.set_verbosity(previous)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    help="Compress Mixture-of-Experts language models and save checkpoints that load anywhere.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=_OneLineUsageErrors,
)


def _print_version(value: bool) -> None:
    if value:
        out_console.print(f"moe-compress {__version__}", markup=False, highlight=False)
        raise typer.Exit()


@app.callback()
def _main_options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but results, warnings and errors (no progress). Also accepted after the command.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also show the libraries' own logs, progress bars and warnings (silenced by default). Also accepted after the command.")] = False,
) -> None:
    """Compress Mixture-of-Experts language models and save checkpoints that load anywhere."""


#: OS errors that are about the user's paths or machine, not bugs: one line, exit 2.
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENOENT}


def user_errors(command: Callable) -> Callable:
    """Print user errors as one clear line and exit 2, instead of a traceback.

    Float options must be finite (a NaN ratio or learning rate would pass every range check);
    output locks are released when the command ends, however it ends. A model that cannot be
    found is answered first, before torch and transformers are imported.
    """
    @wraps(command)
    def wrapper(*args, **kwargs):
        try:
            if isinstance(kwargs.get("model"), str):
                from .io.locate import resolve_model

                resolve_model(kwargs["model"])
            from .finite import require_finite_numbers
            from .io.output_lock import output_locks

            with output_locks():
                require_finite_numbers((f"--{name.replace('_', '-')}", value) for name, value in kwargs.items())
                return command(*args, **kwargs)
        except MoECompressError as exc:
            _error_line(str(exc))
            raise typer.Exit(2) from None
        except OSError as exc:
            if exc.errno not in _USER_OS_ERRORS:
                raise
            _error_line(f"{exc.strerror}: {exc.filename or ''}".rstrip(": ") + "; check the path, its permissions and free space.")
            raise typer.Exit(2) from None

    return wrapper


def _require_positive(**options: int | None) -> None:
    """Each given option (None: not given) must be an integer >= 1."""
    for name, value in options.items():
        if value is not None and value < 1:
            raise MoECompressError(f"--{name.replace('_', '-')} must be a positive integer; got {value}.")


def _writable_file(path: Path | None, option: str) -> None:
    """Fail before any work if `path` cannot be written later (a directory, a missing or read-only parent)."""
    if path is None:
        return
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise MoECompressError(f"{option} {path} is a directory; give a file name.")
    if not parent.is_dir():
        raise MoECompressError(f"{option} {path}: directory {parent} does not exist; create it or choose another path.")
    if not os.access(parent, os.W_OK):
        raise MoECompressError(f"{option} {path}: directory {parent} is not writable; choose another path.")


def _directory_option(path: Path | None, option: str = "--cache-dir") -> None:
    """A directory option (created if missing) must not name an existing file."""
    if path is not None and path.exists() and not path.is_dir():
        raise MoECompressError(f"{option} {path} is a file, not a directory; pass a directory (it is created if missing).")


_human = human_count
_bytes = human_bytes


def _verify(model: str, enabled: bool) -> None:
    """--verify-checksums: every file of the checkpoint against the hash its Hub cache records, before anything reads it."""
    if enabled:
        from .io.load import resolve_model
        from .io.verify import verify_checksums

        verify_checksums(resolve_model(model), model)


def _open_model(model, *args, **kwargs):
    """`io.open.open_model` with a progress line: loading a large model whole takes minutes."""
    from .io.open import open_model

    with progress.step(f"loading {model}"):
        return open_model(model, *args, **kwargs)


def _load_model(model, **kwargs):
    """`io.load.load_model` with a progress line."""
    from .io.load import load_model

    with progress.step(f"loading {model}"):
        return load_model(model, **kwargs)


_print_table = progress.show_table
_say = progress.say


def _notes(*lines: str) -> None:
    """Lines that qualify the results just printed (the protocol in force, what was cached):
    part of the result, so printed to stdout, and never wrapped into a table caption."""
    for line in lines:
        if line:
            _say(line)


ModelArg = Annotated[str, typer.Argument(help="Checkpoint directory, bundled model name (ref-mixtral, ref-deepseek) or Hub id.")]
DtypeOpt = Annotated[str, typer.Option(help="Weights dtype in memory: auto (as saved), float32, bfloat16 or float16.")]
DeviceOpt = Annotated[str, typer.Option(help="Device for computation (cpu, cuda, cuda:1). Layers visit it one at a time while calibrating.")]
CalibOpt = Annotated[str, typer.Option(help="Calibration text: a file (.txt/.jsonl/.parquet), a directory, 'bundled[:domain]' or 'hf:<dataset>'.")]
SeedOpt = Annotated[int, typer.Option(help="Seed that picks the calibration sequences.")]
BatchOpt = Annotated[int, typer.Option(help="Sequences per forward pass.")]
SamplesOpt = Annotated[int, typer.Option(help="Number of calibration sequences.")]
SeqLenOpt = Annotated[int, typer.Option(help="Tokens per calibration sequence.")]
TextFieldOpt = Annotated[str, typer.Option(help="Field/column holding the text in .jsonl/.parquet/datasets.")]
VerifyOpt = Annotated[bool, typer.Option("--verify-checksums", help="Before loading, hash every file of the checkpoint and compare it with the sha256 (git sha1 for small files) its Hugging Face cache snapshot records: its blob's name. A damaged file is refused, naming it. Only a Hub cache snapshot records hashes: a plain directory (save_pretrained or moe-compress outputs, files copied out of the cache) or a Hub id is refused with this option. Without it, only the safetensors headers and finite weights are checked.")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Run Python code shipped inside the checkpoint (its auto_map). Off by default: only for checkpoints whose authors you trust. moe-compress's own outputs load without it.")]
StreamingOpt = Annotated[str, typer.Option(help="auto: read the model layer by layer from its checkpoint unless 2.5 times its weights (what a whole load peaks at) fit in the free memory (RAM within the container's limit, or GPU memory with --device cuda), else load it whole; on: always stream; off: always load whole. Streaming gives the same results with one layer in memory.")]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice). On a shared machine, fewer threads than busy cores avoids stalls.")]
MaxActivationOpt = Annotated[str | None, typer.Option(help="Keep at most this much calibration activation memory in RAM (e.g. 4GiB, 500MB; a plain number means GiB); the rest goes to files in --offload-dir. Default: no limit.")]
OffloadDirOpt = Annotated[Path | None, typer.Option(help="Directory for activations beyond --max-activation-memory (default: the system temp dir).")]
CacheDirOpt = Annotated[Path | None, typer.Option(help="Where calibration statistics are cached. Default: $MOE_COMPRESS_CACHE/stats if that variable is set, else ~/.cache/moe_compress/stats.")]
EvalWindowsOpt = Annotated[int, typer.Option("--eval-windows", help="Perplexity windows per text source for --eval (the evaluation protocol; see `moe-compress eval --help`).")]
EvalSeqLenOpt = Annotated[int, typer.Option("--eval-seq-len", help="Tokens per perplexity window for --eval (independent of the calibration --seq-len).")]
EvalOpt = Annotated[str | None, typer.Option("--eval", help="Measure perplexity on this text before and after (same forms as --calib; 'bundled': each bundled domain's test split), with the evaluation protocol of --eval-windows / --eval-seq-len.")]
IgnorePlanIdentityOpt = Annotated[bool, typer.Option(
    "--ignore-plan-identity",
    help="Apply the plan even when its weights fingerprint does not match this model's or cannot be compared with it "
         "(a plan without one, or one made streamed applied to a model in memory that was not read from its checkpoint), "
         "with a warning; e.g. a plan made on a base model for its fine-tune. Layer, expert and routing counts are always checked.",
)]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Check every input, print what would be done (the plan itself with --plan-in) and exit: no calibration, nothing written.")]


def _streaming(value: str) -> bool | str:
    choices = {"auto": "auto", "on": True, "off": False}
    if value not in choices:
        raise MoECompressError(f"--streaming must be auto, on or off; got {value!r}.")
    return choices[value]


def _byte_size(text: str | None, option: str) -> int | None:
    """'4GiB', '500MB', '2.5' (GiB) -> bytes (see `fitting.memory.parse_bytes`); None stays None."""
    from .fitting.memory import parse_bytes

    return None if text is None else parse_bytes(text, option, allow_zero=True)


@contextmanager
def _runtime(
    threads: int | None = None, max_activation_memory: str | None = None, offload_dir: Path | None = None, device: str = "cpu"
) -> Iterator[str]:
    """Torch threads, the activation memory budget and (under torchrun) the process group for one command.

    Yields the device to compute on: under torchrun with --device cuda, this rank's GPU.
    """
    from .distributed import init_from_environment
    from .observe.activations import activation_budget

    if threads is not None and threads < 1:
        raise MoECompressError(f"--threads must be a positive integer; got {threads}.")
    with _TorchThreads(threads), activation_budget(_byte_size(max_activation_memory, "--max-activation-memory"), offload_dir):
        yield init_from_environment(device)


@app.command()
@user_errors
def inspect(
    model: ModelArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print the structure as JSON instead of tables.")] = False,
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    verify_checksums: VerifyOpt = False,
) -> None:
    """Print a model's MoE structure: layers, experts per layer, top-k, shared experts, parameters and bytes.

    A local checkpoint is read from its config and shard headers alone (no weights are loaded).
    """
    from .arch import get_adapter
    from .evaluate.size import model_size
    from .io.load import resolve_model

    _verify(model, verify_checksums)
    loaded, _, _ = _open_model(model, "cpu", Path(resolve_model(model)).is_dir(), dtype, trust_remote_code)
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
    _print_table(table)
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
    _print_table(params)


def _renormalize_option(value: str | None) -> str | bool | None:
    """--renormalize model|true|false as the REAP method's option value."""
    if value is None:
        return None
    choices = {"model": "model", "true": True, "false": False}
    if value.lower() not in choices:
        raise MoECompressError(f"--renormalize must be model, true or false; got {value!r}.")
    return choices[value.lower()]


@app.command()
@user_errors
def prune(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory to write the pruned checkpoint to (written atomically).")],
    method: Annotated[str, typer.Option(help="Method: frequency, soft_count, gate_sum, ean, reap, mone, cprune, cprune-cosine, or merging: hc-smoe, m-smoe, ream (see `moe-compress methods`).")] = "reap",
    ratio: Annotated[float, typer.Option(help="Fraction of routed experts to remove, in [0, 1).")] = 0.25,
    budget: Annotated[str, typer.Option(help="layer: every MoE layer loses the same share; global: layers compete for one total.")] = "layer",
    calib: CalibOpt = "bundled",
    samples: SamplesOpt = 128,
    seq_len: SeqLenOpt = 256,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 8,
    text_field: TextFieldOpt = "text",
    min_keep: Annotated[int, typer.Option(help="Global budget only: fewest experts any layer may keep (never below top-k).")] = 0,
    uniform: Annotated[bool, typer.Option("--uniform", help=(
        "Global budget only: round the global plan to the same count in every MoE layer (its total shared equally; which experts "
        "by the same scores), a stock checkpoint serving engines load. The summary and card show both plans; with --eval both are "
        "measured (perplexity, KL against the original; in memory this holds a copy of the original, streamed only the saved one is)."
    ))] = False,
    plan_in: Annotated[Path | None, typer.Option(help="Apply this plan JSON instead of deciding from calibration.")] = None,
    ignore_plan_identity: IgnorePlanIdentityOpt = False,
    plan_out: Annotated[Path | None, typer.Option(help="Also write the plan JSON here (it is always saved in --out).")] = None,
    eval_ppl: EvalOpt = None,
    eval_windows: EvalWindowsOpt = DEFAULT_PROTOCOL.windows,
    eval_seq_len: EvalSeqLenOpt = DEFAULT_PROTOCOL.seq_len,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it already exists.")] = False,
    cache_dir: CacheDirOpt = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the statistics cache.")] = False,
    fusion: Annotated[str | None, typer.Option(help="mone: how access frequency and output variance combine: product, minmax_product or weighted_sum.")] = None,
    fusion_weight: Annotated[float | None, typer.Option(help="mone: weight of access frequency in weighted_sum fusion, in [0, 1].")] = None,
    no_novice: Annotated[bool, typer.Option("--no-novice", help="mone: keep router rows but give pruned experts zero vectors (ablation).")] = False,
    renormalize: Annotated[str | None, typer.Option(help="reap: renormalise the top-k gates as the model does (model, the authors' rule), always (true) or never (false).")] = None,
    global_scores: Annotated[str | None, typer.Option(help="mone, global budget: compare raw fused scores across layers (raw, the authors' model scope) or each layer's share (layer_normalised).")] = None,
    variance: Annotated[str | None, typer.Option(help="mone: output variance as the authors' running estimate (running) or the population variance (exact).")] = None,
    clusters: Annotated[int | None, typer.Option(help="cprune: clusters per layer in stage 1 (reference 12); cprune-cosine: default as many as experts kept.")] = None,
    global_clusters: Annotated[int | None, typer.Option(help="cprune: clusters across layers in stage 2 (reference 6).")] = None,
    cluster_batch: Annotated[int | None, typer.Option(help="cprune: calibration sequences clustered together, each batch voting once (reference 32).")] = None,
    stage1_rate: Annotated[float | None, typer.Option(help="cprune: stage-1 prune rate (default: the ratio per layer, or 1 - sqrt(1 - ratio) with a global budget).")] = None,
    stage2_rate: Annotated[float | None, typer.Option(help="cprune: stage-2 prune rate of the survivors (default: whatever reaches the ratio).")] = None,
    linkage: Annotated[str | None, typer.Option(help="cprune-cosine: agglomerative linkage: average, complete, single or weighted.")] = None,
    stage1_share: Annotated[float | None, typer.Option(help="cprune-cosine: share of the removal done per layer in stage 1; the rest is global (stage 2).")] = None,
    probe_tokens: Annotated[int | None, typer.Option(help="cprune-cosine: tokens per batch in the shared probe that defines expert signatures.")] = None,
    max_layer_loss: Annotated[float | None, typer.Option(help="cprune-cosine: most any layer may lose in stage 2, as a fraction of its experts (default: twice the ratio, at most 0.75).")] = None,
    align: Annotated[str | None, typer.Option(help="hc-smoe, m-smoe, ream: align merged experts' neurons first: none, weights, activations or activations+weights (ream's default).")] = None,
    group_size: Annotated[int | None, typer.Option(help="ream: most experts per merge group (pseudo-pruning, default 16); 0 sends every expert to its most similar centroid.")] = None,
    protect_super_experts: Annotated[bool | None, typer.Option("--protect-super-experts/--no-protect-super-experts", help="Never remove or merge super experts (extreme down-projection outliers, see `moe-compress methods`). Default: on.")] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    verify_checksums: VerifyOpt = False,
    streaming: StreamingOpt = "auto",
    threads: ThreadsOpt = None,
    max_activation_memory: MaxActivationOpt = None,
    offload_dir: OffloadDirOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Prune, replace or merge routed experts with a registered method (or a saved plan) and save the result."""
    from .stages.prune import prune as compress
    from .data.batches import CalibrationSpec
    from .io.load import check_device
    from .io.save import check_output_dir
    from .methods.budget import check_ratio
    from .methods.uniform import check_uniform
    from .preflight import Structure, check_prune

    given = {
        "fusion": fusion, "fusion_weight": fusion_weight, "novices": False if no_novice else None, "clusters": clusters,
        "linkage_method": linkage, "stage1_share": stage1_share, "probe_tokens": probe_tokens, "max_layer_loss": max_layer_loss,
        "renormalize": _renormalize_option(renormalize), "global_scores": global_scores, "global_clusters": global_clusters,
        "batch": cluster_batch, "stage1_rate": stage1_rate, "stage2_rate": stage2_rate, "variance": variance,
        "align": align, "group_size": group_size, "protect_super_experts": protect_super_experts,
    }
    options = {k: v for k, v in given.items() if v is not None}
    if plan_in is None:
        check_ratio(ratio)
    if uniform:
        check_uniform(method, budget, plan_in is not None)
    _require_positive(clusters=clusters, probe_tokens=probe_tokens, global_clusters=global_clusters, cluster_batch=cluster_batch)
    protocol = _protocol(eval_windows, eval_seq_len)
    spec = CalibrationSpec(calib, samples, seq_len, seed, batch_size, text_field)
    spec.validate()
    _writable_file(plan_out, "--plan-out")
    _directory_option(cache_dir)
    check_device(device)
    _verify(model, verify_checksums)
    if dry_run:
        from .dry_run import dry_run_prune

        dry_run_prune(model, out, overwrite, plan_in, method, options, ratio, budget, min_keep, spec, eval_ppl, protocol, dtype, trust_remote_code,
                      ignore_plan_identity, uniform)
        return
    check_output_dir(out, overwrite, [model, plan_in])
    with _runtime(threads, max_activation_memory, offload_dir, device) as device:
        loaded, tokenizer, weights = _open_model(model, device, _streaming(streaming), dtype, trust_remote_code)
        if plan_in is None:  # everything the model's structure decides fails now, before calibration and evaluation
            check_prune(Structure.of(loaded), method, options, ratio, budget, min_keep)
        eval_sets = _eval_sets(protocol, eval_ppl, tokenizer, loaded.config)
        before = _perplexities(loaded, eval_sets, weights, device, "before")
        # --uniform --eval measures the global plan too, against the original: an in-memory run is changed in place
        original = loaded if weights.streamed or not (uniform and eval_sets) else copy.deepcopy(loaded)
        result = compress(
            weights, method, ratio, budget, spec, tokenizer, plan=plan_in, ignore_plan_identity=ignore_plan_identity, out=out,
            overwrite=overwrite, min_keep=min_keep, options=options, cache_dir=False if no_cache else cache_dir, device=device,
            uniform=uniform,
        )
        if result.plan is None:  # a rank other than 0 of a distributed run: rank 0 reports
            return
        after = _perplexities_after(result, eval_sets, device)
        if uniform and eval_sets:
            _measure_uniform(result, original, weights if weights.streamed else None, eval_sets, after, device)
    _report_compression(result, "pruned", model, out, plan_out, protocol, before, after)
    if uniform:
        _report_uniform(result.summary["uniform"], model, out)


def _measure_uniform(result, original, original_weights, eval_sets: dict, after: dict[str, float], device: str) -> None:
    """Perplexity and fidelity against the original of the saved uniform model and of the global plan it was
    rounded from, into `result.summary["uniform"]`. The global plan is applied to a copy of the original in
    memory; a streamed run holds no model to apply it to, so there only the saved model is measured."""
    from .arch import get_adapter
    from .evaluate.fidelity import fidelity
    from .io.load import load_streamed
    from .surgery.experts import apply_plan

    def quality(model, weights, perplexities: dict[str, float]) -> dict:
        measured = {s: fidelity(model, original, windows, weights=weights, original_weights=original_weights, device=device)
                    for s, windows in eval_sets.items()}
        return {"perplexity": perplexities, "kl": {s: f.kl for s, f in measured.items()},
                "top1_agreement": {s: f.top1_agreement for s, f in measured.items()}}

    plans = result.summary["uniform"]
    if result.model is not None:
        plans["uniform"] |= quality(result.model, None, after)
        shaped = copy.deepcopy(original)
        apply_plan(shaped, result.global_plan, get_adapter(shaped))
        plans["global"] |= quality(shaped, None, _perplexities(shaped, eval_sets, when="global plan"))
    else:
        saved, _ = load_streamed(result.output_dir)
        plans["uniform"] |= quality(saved.model, saved, after)
        plans["global"]["note"] = "The global plan's quality is not measured in a streamed run (no model is held in memory to apply it to)."


def _report_uniform(plans: dict, model: str, out: Path) -> None:
    """--uniform: both plans side by side (kept counts, size, quality when measured), the measured quality recorded in the output."""
    from .io.model_card import kept_range, record_uniform

    sources = list(plans["uniform"].get("perplexity") or {})
    if sources:
        record_uniform(out, plans)
    table = Table(title="global plan -> uniform (stock) checkpoint")
    for column in ("plan", "experts kept per MoE layer", "parameters", *(f"{what} {s}" for s in sources for what in ("perplexity", "KL"))):
        table.add_column(column, justify="left" if column == "plan" else "right")
    for name in ("global", "uniform"):
        row = plans[name]
        cells = [f"{row[key][s]:.4f}" if row.get(key) else "-" for s in sources for key in ("perplexity", "kl")]
        table.add_row(name, kept_range(row), _human(row["params_after"]), *cells)
    _print_table(table)
    if not sources:
        _notes(f"quality of both plans not measured: add --eval bundled to measure both (perplexity, KL against the original), "
               f"or `moe-compress eval {out} --ppl bundled --compare {model}` the saved one")
    _notes(plans["global"].get("note", ""))


def _protocol(windows: int, seq_len: int, options: tuple[str, str] = ("--eval-windows", "--eval-seq-len")) -> EvalProtocol:
    protocol = EvalProtocol(windows, seq_len)
    protocol.validate(options)
    return protocol


def _eval_sets(protocol: EvalProtocol, sources: str | list[str] | None, tokenizer, config, option: str = "--eval-seq-len") -> dict:
    """Source -> its protocol windows ('bundled' expands to one source per domain)."""
    from .evaluate.protocol import expand_sources

    return {source: protocol.windows_of(tokenizer, source, config, option) for source in expand_sources(sources)} if sources else {}


def _perplexities(model, eval_sets: dict, weights=None, device: str = "cpu", when: str = "") -> dict[str, float]:
    from .evaluate.lm_perplexity import perplexity

    label = f" ({when})" if when else ""
    return {source: perplexity(model, windows, weights=weights, device=device, description=f"perplexity {source}{label}").perplexity
            for source, windows in eval_sets.items()}


def _perplexities_after(result, eval_sets: dict, device: str) -> dict[str, float]:
    """Perplexities of a compression result: the model in memory, or the checkpoint a streamed run wrote."""
    from .io.load import load_streamed

    if not eval_sets:
        return {}
    if result.model is not None:
        return _perplexities(result.model, eval_sets, when="after")
    weights, _ = load_streamed(result.output_dir)
    return _perplexities(weights.model, eval_sets, weights, device, "after")


def _size_table(title: str, summary: dict, before: dict[str, float], after: dict[str, float]) -> Table:
    """Parameters, active parameters and bytes before/after, and perplexity per source when measured."""
    table = Table(title=title)
    for column in ("", "before", "after", "change"):
        table.add_column(column, justify="right" if column else "left")
    for label, key, show in (("parameters", "params", _human), ("active params/token", "active_params", _human), ("bytes in memory", "bytes", _bytes)):
        if f"{key}_before" in summary:
            first, last = summary[f"{key}_before"], summary[f"{key}_after"]
            table.add_row(label, show(first), show(last), percent_change(last, first))
    for source, value in after.items():
        table.add_row(f"perplexity {source}", f"{before[source]:.3f}", f"{value:.3f}", percent_change(value, before[source]))
    return table


def _report_compression(result, verb: str, model: str, out: Path, plan_out: Path | None, protocol: EvalProtocol | None,
                        before: dict[str, float], after: dict[str, float]) -> None:
    """What every structural command prints after it saved: the plan, the size (and quality)
    table, the protocol in force, the checkpoint line, and what was written and how to load it."""
    if plan_out is not None:
        result.plan.save(plan_out)
    s = result.summary
    if result.plan is not None:
        _print_table(result.plan.table())
    _print_table(_size_table(f"{verb} {model} -> {out}", s, before, after))
    cached = " (statistics from cache)" if s.get("statistics_from_cache") else ""
    _notes(protocol.describe() if after and protocol else "",
           f"checkpoint: {_bytes(s['checkpoint_bytes'])} in {out}; time {s['seconds']:.1f}s{cached}; peak memory {_bytes(s['peak_rss_bytes'])}")
    _saved(out, protocol, before, after)


def _saved(out: Path, protocol: EvalProtocol | None = None, before: dict[str, float] | None = None, after: dict[str, float] | None = None) -> None:
    """After every save: record measured quality in the output, then say what was written and how to load it."""
    from .io.model_card import loading_info, record_evaluation

    if after and protocol is not None and before:
        record_evaluation(out, protocol.describe(), {source: (before[source], value) for source, value in after.items()})
    info = loading_info(out)
    _say(f"saved {out}: {info.describe()}; model card {out / 'README.md'}")
    _say("load it with:")
    for line in info.snippet(str(out)).splitlines():
        _say("    " + line)


def _checkpoint_bytes(name: str) -> int | None:
    """Weight-file bytes of a local or bundled checkpoint; None for a Hub id (nothing on disk here)."""
    from .evaluate.size import checkpoint_bytes
    from .io.load import resolve_model

    path = Path(resolve_model(name))
    return checkpoint_bytes(path) if path.is_dir() else None


def _evaluate_model(
    name: str, loaded, tokenizer, sources: list[str], selection, limit: int | None, seq_len: int, max_windows: int, batch_size: int,
    weights=None, device: str = "cpu", perplexities: bool = True,
) -> dict:
    """Everything `eval` reports for one model except speed (timed separately, so --compare can interleave it)
    and, without `perplexities`, perplexity (--compare measures it with fidelity, from the same forward)."""
    from .arch import get_adapter
    from .evaluate.harness import run_tasks
    from .evaluate.lm_perplexity import perplexity
    from .evaluate.size import model_size
    from .evaluate.speed import peak_rss_bytes

    size = model_size(loaded, get_adapter(loaded))
    report: dict = {
        "model": name,
        "perplexity": {
            s: perplexity(loaded, EvalProtocol(max_windows, seq_len).windows_of(tokenizer, s, loaded.config, "--seq-len"), batch_size, weights,
                          device, description=f"perplexity {s} ({name})").to_dict()
            for s in (sources if perplexities else [])
        },
        "tasks": {},
        "params": {"total": size.total, "routed": size.routed_experts, "active_per_token": size.active_per_token},
        "bytes_in_memory": size.bytes,
        "checkpoint_bytes": _checkpoint_bytes(name),
    }
    if selection is not None:
        with progress.step(f"lm-eval tasks {', '.join(selection.names)} ({name})"), progress.libraries_silenced():
            scores = run_tasks(loaded, tokenizer, selection, limit, batch_size, weights=weights, device=device)
        report["tasks"] = {t: s.to_dict() for t, s in scores.items()}
    report["peak_rss_bytes"] = peak_rss_bytes()
    return report


def _fidelity(loaded, original, tokenizer, sources: list[str], seq_len: int, max_windows: int, batch_size: int, weights: tuple, device: str,
              report: dict) -> None:
    """Per source, KL(original || compressed) and top-1 agreement on the perplexity windows (teacher-forced) into
    report["fidelity"], and both models' perplexities from the same forward passes."""
    from .evaluate.fidelity import compare

    if loaded.config.vocab_size != original.config.vocab_size:
        raise MoECompressError(
            f"--compare: vocabularies differ ({loaded.config.vocab_size} vs {original.config.vocab_size} tokens), so next-token distributions cannot be compared."
        )
    mine, theirs = weights
    report["fidelity"] = {}
    for s in sources:
        windows = EvalProtocol(max_windows, seq_len).windows_of(tokenizer, s, loaded.config, "--seq-len")
        measured, report["perplexity"][s], report["original"]["perplexity"][s] = (
            r.to_dict() for r in compare(loaded, original, windows, batch_size, mine, theirs, device)
        )
        report["fidelity"][s] = measured


def _comparison(mine: dict, theirs: dict, speed) -> dict:
    """Deltas of `mine` against `theirs`: ratios for costs and perplexity, differences for accuracies."""

    def ratio(a, b):
        return a / b if a is not None and b else None

    def delta(a, b):
        return a - b if a is not None and b is not None else None

    return {
        "perplexity_ratio": {s: ratio(r["perplexity"], theirs["perplexity"].get(s, {}).get("perplexity")) for s, r in mine["perplexity"].items()},
        "acc_delta": {t: delta(r["acc"], theirs["tasks"].get(t, {}).get("acc")) for t, r in mine["tasks"].items()},
        "acc_norm_delta": {t: delta(r["acc_norm"], theirs["tasks"].get(t, {}).get("acc_norm")) for t, r in mine["tasks"].items()},
        "params_ratio": {k: ratio(v, theirs["params"][k]) for k, v in mine["params"].items()},
        "checkpoint_bytes_ratio": ratio(mine["checkpoint_bytes"], theirs["checkpoint_bytes"]),
        "speed": {"prefill_ratio": speed.prefill_ratio, "decode_ratio": speed.decode_ratio} if speed is not None else None,
    }


def _eval_table(report: dict) -> tuple[Table, list[str]]:
    """One row per measurement; with --compare, the original's column and the change. Also the
    lines that qualify it (printed under it, not as a caption: a caption wraps to the table's width)."""
    original = report.get("original")
    comparison = report.get("comparison") or {}
    table = Table(title=f"evaluation of {report['model']}" + (f" against {original['model']}" if original else ""))
    table.add_column("measure")
    table.add_column(report["model"], justify="right")
    if original:
        table.add_column(original["model"] + " (original)", justify="right")
        table.add_column("change", justify="right")

    def row(label: str, mine: str, theirs: str = "", change: str = "") -> None:
        table.add_row(label, mine, *((theirs, change) if original else ()))

    def pct(r: float | None) -> str:
        return percent_change(r, 1.0) if r is not None else "-"

    def acc(score: dict | None, key: str) -> str:
        if not score or score.get(key) is None:
            return "-"
        err = score.get(f"{key}_stderr")
        return f"{score[key]:.3f}" + (f" ± {err:.3f}" if err is not None else "")

    def points(d: float | None) -> str:
        return f"{100 * d:+.1f} pts" if d is not None else "-"

    theirs = original or {"perplexity": {}, "tasks": {}, "params": {}, "speed": None}
    for source, r in report["perplexity"].items():
        other = theirs["perplexity"].get(source)
        row(f"ppl {source.removeprefix('bundled:')}", f"{r['perplexity']:.3f}", f"{other['perplexity']:.3f}" if other else "", pct(comparison.get("perplexity_ratio", {}).get(source)))
    for source, f in (report.get("fidelity") or {}).items():
        name = source.removeprefix("bundled:")
        row(f"KL to original {name}", f"{f['kl']:.4f}", "0", "")
        row(f"top-1 agreement {name}", f"{f['top1_agreement']:.3f}", "1", "")
    for task, score in report["tasks"].items():
        other = theirs["tasks"].get(task)
        for key in ("acc", "acc_norm"):
            row(f"{key} {task}", acc(score, key), acc(other, key), points(comparison.get(f"{key}_delta", {}).get(task)))
    notes = []
    if report["tasks"]:
        counts = sorted({s["samples"] for s in report["tasks"].values() if s.get("samples") and not s.get("group")})
        notes.append(f"accuracy ± stderr over {'/'.join(map(str, counts))} questions per task; chance is 1/choices (0.25 for moec)")
    for key, label in (("total", "parameters"), ("routed", "routed-expert params"), ("active_per_token", "active params/token")):
        row(label, _human(report["params"][key]), _human(theirs["params"][key]) if original else "", pct(comparison.get("params_ratio", {}).get(key)))
    for key, label in (("checkpoint_bytes", "checkpoint bytes"), ("bytes_in_memory", "bytes in memory"), ("peak_rss_bytes", "peak RSS (process)")):
        mine, other = report.get(key), theirs.get(key)
        change = pct(comparison.get("checkpoint_bytes_ratio")) if key == "checkpoint_bytes" else ""
        row(label, _bytes(mine) if mine is not None else "-", _bytes(other) if other is not None else "", change)
    if report.get("speed"):
        speed, other = report["speed"], theirs.get("speed") or {}
        ratios = comparison.get("speed") or {}
        for phase in ("prefill", "decode"):
            key = f"{phase}_tokens_per_s"
            ratio = ratios.get(f"{phase}_ratio")
            row(f"{phase} tokens/s", f"{speed[key]:,.1f}", f"{other[key]:,.1f}" if other else "", f"×{ratio:.3f}" if ratio is not None else "")
    return table, notes


class _TorchThreads:
    """torch's CPU thread count for the block, restored after (the CLI also runs inside other processes, e.g. tests)."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads

    def __enter__(self) -> None:
        import torch

        self.before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self.before)


@app.command("eval")
@user_errors
def evaluate(
    model: ModelArg,
    ppl: Annotated[list[str] | None, typer.Option(help="Text to measure perplexity on; repeatable. 'bundled' gives one result per bundled domain (test split).")] = None,
    tasks: Annotated[str | None, typer.Option(help="Comma-separated lm-evaluation-harness tasks or groups: 'moec' (our offline multiple-choice tasks on the bundled test split), its tasks, or any lm-eval task (those need the Hub).")] = None,
    limit: Annotated[int | None, typer.Option(help="Score at most this many questions per task (the first ones).")] = None,
    speed: Annotated[bool | None, typer.Option("--speed/--no-speed", help="Measure prefill and decode throughput (tokens/s, greedy, KV cache). Default: on with --compare, off otherwise.")] = None,
    compare: Annotated[str | None, typer.Option(help="An original model (same forms as MODEL): evaluate it the same way, show the changes, and time both interleaved in this process.")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", "--eval-seq-len", help="Tokens per perplexity window (windows do not overlap: the stride is the window).")] = DEFAULT_PROTOCOL.seq_len,
    max_windows: Annotated[int, typer.Option("--max-windows", "--eval-windows", help="Perplexity windows per text source (the first ones of its test split; fewer if the text is shorter).")] = DEFAULT_PROTOCOL.windows,
    batch_size: Annotated[int, typer.Option(help="Windows (perplexity) or requests (tasks) per forward pass.")] = 8,
    speed_batch: Annotated[int, typer.Option(help="Prompts per batch when timing.")] = 4,
    speed_prompt_len: Annotated[int, typer.Option(help="Prompt tokens per prompt when timing prefill (cut to fit the model's positions).")] = 128,
    speed_new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt when timing decode.")] = 32,
    speed_repeats: Annotated[int, typer.Option(help="Timed runs per model (after one warm-up); medians are reported.")] = 5,
    threads: ThreadsOpt = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON to this file.")] = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    verify_checksums: VerifyOpt = False,
    streaming: StreamingOpt = "auto",
    max_activation_memory: MaxActivationOpt = None,
    offload_dir: OffloadDirOpt = None,
) -> None:
    """Evaluate a model: perplexity, multiple-choice accuracy (lm-eval), parameters, bytes, memory and speed.

    Perplexity follows one evaluation protocol everywhere (prune/slim --eval, recipes, the demo):
    by default the first 128 windows of 256 tokens of each source's test split, without overlap
    (32,768 tokens per source); --max-windows and --seq-len change it, and the protocol in force
    is printed under the results.

    With --compare ORIGINAL both models are evaluated the same way in one process and the table
    shows the changes. JSON keys: model, seq_len, settings, perplexity, tasks, params (total,
    routed, active_per_token), bytes_in_memory, checkpoint_bytes, peak_rss_bytes, speed; with
    --compare also original (the same keys), comparison, and fidelity: per --ppl source the
    mean KL(original || this model) per token and the top-1 agreement, teacher-forced.
    """
    from .evaluate.harness import parse_task_list, select_tasks
    from .evaluate.protocol import expand_sources
    from .evaluate.speed import SpeedSettings, compare_speed, measure_speed, peak_rss_bytes, speed_prompts
    from .io.load import check_device, load_config

    _require_positive(seq_len=seq_len, max_windows=max_windows, batch_size=batch_size, limit=limit, threads=threads)
    _writable_file(json_out, "--json")
    check_device(device)
    speed = compare is not None if speed is None else speed
    settings = SpeedSettings(speed_batch, speed_prompt_len, speed_new_tokens, speed_repeats)
    settings.validate()
    # Everything that can be wrong with the input fails here, before any model is loaded.
    task_names = parse_task_list(tasks) if tasks is not None else []
    selection = None
    if task_names:
        with progress.step("loading lm-eval tasks"), progress.libraries_silenced():
            selection = select_tasks(task_names)
    if compare is not None:
        load_config(compare, trust_remote_code)
    protocol = _protocol(max_windows, seq_len, ("--max-windows", "--seq-len"))
    sources = expand_sources(ppl or [])
    for checked in (model, compare) if compare is not None else (model,):
        _verify(checked, verify_checksums)

    mode = _streaming(streaming)
    with _runtime(threads, max_activation_memory, offload_dir):
        loaded, tokenizer, weights = _open_model(model, device, mode, dtype, trust_remote_code)
        if speed and weights.streamed:
            raise MoECompressError("speed is measured on a model held in memory; pass --no-speed to evaluate a streamed model.")
        report = {
            "model": model,
            "seq_len": seq_len,
            "settings": {
                "ppl": sources, "tasks": task_names, "limit": limit, "max_windows": max_windows, "batch_size": batch_size,
                "dtype": dtype, "device": device, "threads": threads, "speed": vars(settings) if speed else None,
            },
        }
        report["settings"]["streamed"] = weights.streamed
        report["settings"]["protocol"] = protocol.to_dict() if sources else None
        report |= _evaluate_model(model, loaded, tokenizer, sources, selection, limit, seq_len, max_windows, batch_size, weights, device,
                                  perplexities=compare is None)
        original = original_tokenizer = None
        if compare is not None:
            original, original_tokenizer, original_weights = _open_model(compare, device, mode, dtype, trust_remote_code)
            report["original"] = _evaluate_model(
                compare, original, original_tokenizer, sources, selection, limit, seq_len, max_windows, batch_size, original_weights, device,
                perplexities=False,
            )
            _fidelity(loaded, original, tokenizer, sources, seq_len, max_windows, batch_size, (weights, original_weights), device, report)
        comparison = None
        report["speed"] = None
        if speed:
            positions = getattr(loaded.config, "max_position_embeddings", None)
            prompts = speed_prompts(tokenizer, loaded.config.vocab_size, settings, positions)
            if original is not None:
                comparison = compare_speed(loaded, original, prompts, settings)
                report["speed"], report["original"]["speed"] = comparison.model.to_dict(), comparison.original.to_dict()
            else:
                report["speed"] = measure_speed(loaded, prompts, settings).to_dict()
                report["peak_rss_bytes"] = peak_rss_bytes()
        elif original is not None:
            report["original"]["speed"] = None
        if original is not None:
            report["comparison"] = _comparison(report, report["original"], comparison)
    table, notes = _eval_table(report)
    _print_table(table)
    _notes(*notes, protocol.describe() if sources else "")
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2) + "\n")


@app.command("drop")
@user_errors
def drop_command(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory to write the result to (written atomically).")],
    unit: Annotated[str, typer.Option(help="moe: drop MoE sub-layers (attention stays); block: drop whole decoder layers.")] = "moe",
    drop: Annotated[int | None, typer.Option("--drop", help="How many sub-layers or blocks to drop.")] = None,
    target_ratio: Annotated[float | None, typer.Option(help="Instead of --drop: fraction of all parameters to remove, in (0, 1).")] = None,
    mode: Annotated[str, typer.Option(help="block only: discrete (most similar single blocks) or consecutive (best run).")] = "discrete",
    consecutive_score: Annotated[str, typer.Option(help="consecutive only: span scores a run of n blocks by cos(h_i, h_i+n); framework by cos(h_i, h_i+n+1), as the unified framework's code.")] = "span",
    calib: Annotated[str, typer.Option(help="Calibration text (same forms as prune --calib).")] = "bundled",
    samples: SamplesOpt = 128,
    seq_len: SeqLenOpt = 256,
    seed: SeedOpt = 0,
    plan_out: Annotated[Path | None, typer.Option(help="Also write the plan JSON here (it is always saved in --out).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it already exists.")] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    verify_checksums: VerifyOpt = False,
    streaming: StreamingOpt = "auto",
    threads: ThreadsOpt = None,
    max_activation_memory: MaxActivationOpt = None,
    offload_dir: OffloadDirOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Layer drop / block drop: remove the MoE sub-layers or blocks that change the residual stream least."""
    from .stages.drop import MODES, UNITS
    from .stages.drop import drop as drop_layers
    from .data.batches import CalibrationSpec
    from .io.load import check_device
    from .io.save import check_output_dir
    from .preflight import Structure, check_drop

    if unit not in UNITS or mode not in MODES:
        raise MoECompressError(f"--unit must be one of {', '.join(UNITS)} and --mode one of {', '.join(MODES)}; got --unit {unit} --mode {mode}.")
    spec = CalibrationSpec(calib, samples, seq_len, seed)
    spec.validate()
    _writable_file(plan_out, "--plan-out")
    check_device(device)
    _verify(model, verify_checksums)
    if dry_run:
        from .dry_run import dry_run_drop

        dry_run_drop(model, out, overwrite, unit, drop, target_ratio, mode, spec, dtype, trust_remote_code)
        return
    check_output_dir(out, overwrite, [model])
    with _runtime(threads, max_activation_memory, offload_dir, device) as device:
        loaded, tokenizer, weights = _open_model(model, device, _streaming(streaming), dtype, trust_remote_code)
        check_drop(Structure.of(loaded), unit, drop, target_ratio)
        result = drop_layers(
            weights, unit, drop, target_ratio, mode, spec, tokenizer, out, overwrite, device,
            consecutive_score=consecutive_score,
        )
    if result.plan is not None:  # None: a rank other than 0 of a distributed run; rank 0 reports
        _report_compression(result, "dropped", model, out, plan_out, None, {}, {})


@app.command("condense")
@user_errors
def condense_command(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory to write the condensed model to (written atomically).")],
    layers: Annotated[int, typer.Option(help="How many MoE layers to condense (at least one must keep routing).")] = 1,
    experts: Annotated[int | None, typer.Option(help="Routed experts each condensed layer keeps, K (default: top-k, as the authors' 6 for DeepSeekMoE-16B); 0 keeps shared experts only (CD-MoE-S).")] = None,
    objective: Annotated[str, typer.Option(help="layer_output: the authors' JSD of the layer output, then of the final hidden state; next_token: JSD of the next-token distribution for both (moe-compress's earlier search).")] = "layer_output",
    choose_size: Annotated[bool, typer.Option("--choose-size", help="Keep the prefix of 1..K experts with the lowest divergence instead of exactly K.")] = False,
    position_stride: Annotated[int, typer.Option(help="next_token objective: score every k-th position only.")] = 1,
    state_file: Annotated[Path | None, typer.Option(help="Where the search saves its progress and resumes from (default: under the cache directory, keyed by model, data and settings).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Discard a saved search state and search again.")] = False,
    calib: Annotated[str, typer.Option(help="Calibration text (same forms as prune --calib).")] = "bundled",
    samples: Annotated[int, typer.Option(help="Calibration sequences (the authors use 100).")] = 32,
    seq_len: SeqLenOpt = 256,
    seed: SeedOpt = 0,
    plan_out: Annotated[Path | None, typer.Option(help="Also write the plan JSON here (it is always saved in --out).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it already exists.")] = False,
    cache_dir: CacheDirOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    verify_checksums: VerifyOpt = False,
    threads: ThreadsOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """CD-MoE: condense MoE layers into shared experts + a few constant-weight experts, chosen by output divergence.

    Memory: unlike prune, drop, slim and quantize, condense does not stream. Its search reruns
    every later layer for each candidate, so it holds the whole model plus every decoder
    layer's input for the calibration tokens (layers x samples x seq-len x hidden, in the model
    dtype); it refuses to start when that exceeds the available memory.
    """
    from .stages.condense import condense
    from .data.batches import CalibrationSpec
    from .io.load import check_device
    from .io.save import check_output_dir
    from .io.load import resolve_model
    from .io.open import available_bytes
    from .preflight import check_condense, check_condense_memory, skeleton

    _require_positive(layers=layers, position_stride=position_stride)
    if experts is not None and experts < 0:
        raise MoECompressError(f"--experts must be 0 (shared experts only) or more; got {experts}.")
    spec = CalibrationSpec(calib, samples, seq_len, seed)
    spec.validate()
    _writable_file(plan_out, "--plan-out")
    _directory_option(cache_dir)
    check_device(device)
    _verify(model, verify_checksums)
    if dry_run:
        from .dry_run import dry_run_condense

        dry_run_condense(model, out, overwrite, layers, experts, choose_size, spec, dtype, trust_remote_code)
        return
    check_condense(skeleton(model, dtype, trust_remote_code), layers, experts)  # from the config and shard headers: no weight read yet
    check_output_dir(out, overwrite, [model])
    if Path(resolve_model(model)).is_dir():
        check_condense_memory(Path(resolve_model(model)), samples, seq_len, available_bytes("cpu"))
    with _runtime(threads):
        loaded, tokenizer = _load_model(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        result = condense(
            loaded, layers, experts, objective, choose_size, position_stride, spec, tokenizer, out, overwrite, cache_dir, device,
            state_file=state_file, fresh=fresh,
        )
    meta = result.plan.meta
    resumed = " (resumed from a saved state)" if meta["resumed"] else ""
    _say(f"search: {meta['evaluations']} candidate evaluations in {meta['search_seconds']}s{resumed}; layer order {meta['order']}, JSD {[round(v, 5) for v in meta['order_jsd']]}")
    _report_compression(result, "condensed", model, out, plan_out, None, {}, {})


@app.command("finetune")
@user_errors
def finetune_command(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory for the fine-tuned model; checkpoints go to <out>.checkpoints/.")],
    data: Annotated[str, typer.Option(help="Training text (same forms as --calib; 'bundled' uses its calib split).")] = "bundled",
    eval_data: Annotated[str, typer.Option(help="Held-out text for the before/after perplexity ('bundled': valid split).")] = "bundled",
    steps: Annotated[int, typer.Option(help="Optimisation steps.")] = 200,
    lr: Annotated[float, typer.Option(help="Peak learning rate (the CD-MoE authors' 1e-5, decayed linearly).")] = 1e-5,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed for batch sampling.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(help="Save a checkpoint every N steps (0: only the final model).")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it already exists.")] = False,
    device: Annotated[str | None, typer.Option(help="cuda, cpu, ... (default: a GPU if present).")] = None,
    trust_remote_code: TrustOpt = False,
    verify_checksums: VerifyOpt = False,
) -> None:
    """Fine-tune only the condensed layers' shared and kept experts of a condensed model."""
    from .data.batches import check_seed
    from .finetuning import finetune
    from .io.load import check_device
    from .io.save import check_output_dir

    _require_positive(steps=steps, batch_size=batch_size, seq_len=seq_len)
    check_seed(seed)
    if lr <= 0:
        raise MoECompressError(f"--lr must be a positive number; got {lr}.")
    if device is not None:
        check_device(device)
    _verify(model, verify_checksums)
    check_output_dir(out, overwrite, [model])
    loaded, tokenizer = _load_model(model, dtype="float32", trust_remote_code=trust_remote_code)
    report = finetune(loaded, tokenizer, data, steps, lr, batch_size, seq_len, seed, eval_data, out=out,
                      checkpoint_every=checkpoint_every, overwrite=overwrite, device=device)
    table = Table(title=f"fine-tuned {report['trainable_parameters']:,} parameters for {report['steps']} steps on {report['device']}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("training loss", f"{report['first_loss']:.4f}", f"{report['last_loss']:.4f}")
    if report["perplexity_before"] is not None:
        table.add_row(f"perplexity ({eval_data}, valid)", f"{report['perplexity_before']:.3f}", f"{report['perplexity_after']:.3f}")
    _print_table(table)
    _say(f"time {report['seconds']}s")
    _saved(out)


@app.command("run")
@user_errors
def run_command(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML: model, calibration, evaluate, stages (prune, drop, condense, finetune, slim, and quantize as the last), out. Examples in recipes/.")],
    out: Annotated[Path | None, typer.Option(help="Output directory (overrides the recipe's 'out').")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the output directory if it exists.")] = False,
    dry_run: DryRunOpt = False,
) -> None:
    """Run a recipe: compression stages in order on one model, with a report after every stage.

    Every stage's options are checked against the model's structure before calibration starts.
    A recipe lets its model's own Python code run only with a top-level `trust_remote_code: true`.
    """
    from .recipes import describe_recipe, run_recipe
    from .report.composition import stage_report_markdown as report_markdown

    if dry_run:
        for line in describe_recipe(recipe, out, overwrite):
            _say(line)
        return
    report = run_recipe(recipe, out, overwrite)
    _say(report_markdown(report).rstrip())
    _saved(Path(report["out"]))


@app.command()
def families(
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the table as markdown (the README's families section).")] = False,
) -> None:
    """List the MoE model types of the installed transformers: supported or not and why, router, shared experts,
    and which outputs load with plain from_pretrained (the others load with trust_remote_code)."""
    from .arch.family_table import markdown as to_markdown
    from .listings import family_rows

    rows = family_rows()
    if markdown:
        print(to_markdown(rows), end="")
        return
    table = Table(title=f"{sum(r.supported for r in rows)} of {len(rows)} MoE model types supported")
    for column in ("model type", "supported", "router", "shared experts", "stock-loadable outputs", "notes"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.model_type, "yes" if row.supported else f"no: {row.reason}", row.router, row.shared_experts, row.outputs, row.notes)
    out_console.print(table)


@app.command()
def methods() -> None:
    """List every method and stage -- expert pruning and merging, drop, condense, fine-tuning,
    slimming, quantisation -- with its options and their defaults (also the recipe stage options)."""
    from .listings import method_rows

    rows = method_rows()
    table = Table(title="expert methods: moe-compress prune --method NAME (recipe stage: prune)")
    for column in ("family", "name", "what it does", "options (defaults)"):
        table.add_column(column)
    table.caption = ("protect_super_experts: never remove or merge experts whose down-projection output has extreme outliers "
                     "(above the 99.5th percentile and a tenth of the maximum, first 75% of layers; Su et al. 2025)")
    stages = Table(title="stages: moe-compress COMMAND, or a recipe stage of the same name")
    for column in ("stage", "what it does", "options (defaults)"):
        stages.add_column(column)
    for row in rows:
        (table if row["table"] == "methods" else stages).add_row(*row["cells"])
    _print_table(table)
    _print_table(stages)


@app.command()
@user_errors
def analyze(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory for analysis.json, analysis.csv, one heatmap PNG per statistic and the similarity plot(s).")],
    calib: Annotated[str, typer.Option(help="Calibration text (same forms as prune --calib).")] = "bundled",
    samples: SamplesOpt = 64,
    seq_len: SeqLenOpt = 256,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 8,
    clusters: Annotated[int | None, typer.Option(help="Clusters per layer for the cluster-id column and the similarity plot (default: half the experts).")] = None,
    probe_tokens: Annotated[int, typer.Option(help="Tokens per batch in the probe that defines expert signatures.")] = 64,
    normalize: Annotated[str, typer.Option(help="Heatmap colours: none (the statistic's own units, comparable across layers) or layer (each layer divided by its largest value, to compare shapes).")] = "none",
    plan: Annotated[Path | None, typer.Option(help="Mark the experts this plan JSON removes (crossed out in the heatmaps, red in the similarity plot).")] = None,
    ignore_plan_identity: IgnorePlanIdentityOpt = False,
    method: Annotated[str | None, typer.Option(help="Instead of --plan: mark the experts this method would remove at --ratio / --budget, planned from the same statistics (written to plan.json, for prune --plan-in).")] = None,
    ratio: Annotated[float, typer.Option(help="With --method: fraction of routed experts to remove, in [0, 1).")] = 0.25,
    budget: Annotated[str, typer.Option(help="With --method: layer or global.")] = "layer",
    similarity_layer: Annotated[list[int] | None, typer.Option(help="MoE layer whose expert-similarity matrix to plot; repeatable (default: the most redundant layer).")] = None,
    report: Annotated[bool, typer.Option("--report", help="Also write report.html: every plot and table on one self-contained page.")] = False,
    cache_dir: CacheDirOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    verify_checksums: VerifyOpt = False,
    streaming: StreamingOpt = "auto",
    threads: ThreadsOpt = None,
    max_activation_memory: MaxActivationOpt = None,
    offload_dir: OffloadDirOpt = None,
) -> None:
    """Show where the redundancy is: per-layer, per-expert statistics (frequency, gate mass, output
    variance, REAP, cluster) as JSON/CSV, heatmaps and expert-similarity plots, optionally with
    the experts a plan would remove marked, and --report for one HTML page with all of it."""
    from .engine.identity import model_identity
    from .engine.prepare import calibration_batches
    from .engine.statistics import collect_statistics
    from .arch import get_adapter
    from .data.batches import CalibrationSpec
    from .io.load import check_device
    from .methods import PlanRequest, get_method
    from .methods.budget import check_ratio
    from .plan import Plan
    from .report.analysis import Analysis, analysis_statistics, expert_table, removed_by
    from .report.outputs import write_analysis

    _require_positive(clusters=clusters, probe_tokens=probe_tokens)
    if normalize not in ("none", "layer"):
        raise MoECompressError(f"--normalize must be none or layer; got {normalize!r}.")
    if plan is not None and method is not None:
        raise MoECompressError("give --plan or --method, not both.")
    if method is not None:
        get_method(method)
        check_ratio(ratio)
    spec = CalibrationSpec(calib, samples, seq_len, seed, batch_size)
    spec.validate()
    _directory_option(out, "--out")
    _directory_option(cache_dir)
    check_device(device)
    given = Plan.load(plan) if plan is not None else None
    _verify(model, verify_checksums)
    names = analysis_statistics(probe_tokens) + (get_method(method).needs() if method else ())
    with _runtime(threads, max_activation_memory, offload_dir, device) as device:
        loaded, tokenizer, weights = _open_model(model, device, _streaming(streaming), dtype, trust_remote_code)
        adapter = get_adapter(loaded)
        if given is not None:
            given.check_identity(model_identity(loaded, adapter, weights), ignore_plan_identity)
        layers = adapter.moe_layer_indices(loaded)
        unknown = [layer for layer in similarity_layer or [] if layer not in layers]
        if unknown:
            raise MoECompressError(f"--similarity-layer {unknown[0]} is not a MoE layer of this model; its MoE layers: {', '.join(map(str, layers))}.")
        batches = calibration_batches(spec, tokenizer, loaded.config)
        stats, _ = collect_statistics(loaded, batches, names, cache_dir, device, weights)
        if method is not None:
            given = get_method(method).make_plan(PlanRequest(adapter, loaded.config, stats, ratio, budget))
            given.identity = model_identity(loaded, adapter, weights)
    columns, similarity = expert_table(stats, probe_tokens, clusters or 0)
    settings = {"calibration": f"{spec.samples} x {spec.seq_len} tokens of {spec.source} (seed {spec.seed})", "probe tokens": probe_tokens,
                "clusters per layer": clusters or "half the experts"}
    experts = {layer: len(values["frequency"]) for layer, values in columns.items()}
    analysis = Analysis(Path(str(model)).name, columns, similarity, removed_by(given, experts) if given else {}, given, settings)
    written = write_analysis(analysis, out, normalize, similarity_layer, report)
    if method is not None:  # the plan the plots show, ready for `prune --plan-in`
        given.save(out / "plan.json")
        written.append(out / "plan.json")
    _say(f"wrote {len(written)} files to {out}: " + ", ".join(p.name for p in written))


@app.command()
@user_errors
def slim(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory to write the sparsified checkpoint to (written atomically; same shapes, zeros where weights were removed).")],
    method: Annotated[str, typer.Option(help="wanda (|W|*||X||, per output row), sparsegpt (second-order with weight updates) or magnitude (|W|, no calibration).")] = "wanda",
    sparsity: Annotated[float | None, typer.Option(help="Fraction of each output row's weights to zero, in [0, 1). Default 0.5 unless --nm is given.")] = None,
    nm: Annotated[str | None, typer.Option("--nm", help="Semi-structured N:M pattern instead of --sparsity, e.g. 2:4 or 4:8 (at most N nonzeros in every M consecutive input weights).")] = None,
    targets: Annotated[str, typer.Option(help="Comma-separated weights to sparsify: experts (routed experts), shared (shared experts), attention.")] = "experts",
    calib: CalibOpt = "bundled",
    samples: SamplesOpt = 64,
    seq_len: SeqLenOpt = 256,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 8,
    text_field: TextFieldOpt = "text",
    blocksize: Annotated[int, typer.Option(help="sparsegpt: columns per lazy-update block (mask chosen per block).")] = 128,
    damp: Annotated[float, typer.Option(help="sparsegpt: Hessian damping as a fraction of its mean diagonal.")] = 0.01,
    propagate: Annotated[bool, typer.Option("--propagate/--no-propagate", help="Feed each layer the outputs of the already pruned layers (SparseGPT's sequential scheme) or of the original ones.")] = True,
    eval_ppl: EvalOpt = None,
    eval_windows: EvalWindowsOpt = DEFAULT_PROTOCOL.windows,
    eval_seq_len: EvalSeqLenOpt = DEFAULT_PROTOCOL.seq_len,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it already exists.")] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    verify_checksums: VerifyOpt = False,
    streaming: StreamingOpt = "auto",
    threads: ThreadsOpt = None,
    max_activation_memory: MaxActivationOpt = None,
    offload_dir: OffloadDirOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Zero weights inside the experts with Wanda, SparseGPT or magnitude pruning (unstructured or N:M) and save the result."""
    from .data.batches import CalibrationSpec
    from .io.load import check_device
    from .io.save import check_output_dir
    from .preflight import Structure, check_slim
    from .slimming import SLIM_METHODS, make_spec
    from .slimming import slim as slim_model
    from .slimming.observe import check_targets

    if method not in SLIM_METHODS:
        raise MoECompressError(f"unknown slimming method {method!r}; choose one of {', '.join(SLIM_METHODS)}.")
    spec = make_spec(sparsity, nm)  # bad --sparsity / --nm fail before anything is loaded
    chosen = check_targets(targets)
    _require_positive(blocksize=blocksize)
    protocol = _protocol(eval_windows, eval_seq_len)
    calibration = CalibrationSpec(calib, samples, seq_len, seed, batch_size, text_field)
    calibration.validate()
    check_device(device)
    _verify(model, verify_checksums)
    if dry_run:
        from .dry_run import dry_run_slim

        dry_run_slim(model, out, overwrite, method, spec, chosen, calibration, eval_ppl, protocol, dtype, trust_remote_code)
        return
    check_output_dir(out, overwrite, [model])
    with _runtime(threads, max_activation_memory, offload_dir, device) as device:
        loaded, tokenizer, weights = _open_model(model, device, _streaming(streaming), dtype, trust_remote_code)
        check_slim(Structure.of(loaded), chosen)  # e.g. shared experts asked of a model without any: now, not after evaluating
        eval_sets = _eval_sets(protocol, eval_ppl, tokenizer, loaded.config)
        before = _perplexities(loaded, eval_sets, weights, device, "before")
        result = slim_model(
            weights if weights.streamed else loaded, method, sparsity=None if spec.nm else spec.fraction, nm=spec.nm, calib=calibration,
            targets=chosen, tokenizer=tokenizer, out=out, overwrite=overwrite, blocksize=blocksize, damp=damp, propagate=propagate,
            device=device,
        )
        if result.output_dir is None:  # a rank other than 0 of a distributed run: rank 0 reports
            return
        after = _perplexities_after(result, eval_sets, device)
    s = result.summary
    table = Table(title=f"{method} {s['sparsity']} on {', '.join(chosen)}: {model} -> {out}")
    for column in ("target", "matrices", "zeros / weights", "sparsity reached", "no calibration tokens"):
        table.add_column(column, justify="right")
    for kind, row in s["reached"].items():
        table.add_row(kind, str(row["matrices"]), f"{row['zeros']:,} / {row['weights']:,}", f"{100 * row['sparsity']:.2f}%", str(row["no_calibration_tokens"]))
    _print_table(table)
    if after:
        _print_table(_size_table(f"perplexity: {model} -> {out}", {}, before, after))
    _notes(protocol.describe() if after else "",
           f"checkpoint: {_bytes(s['checkpoint_bytes'])} in {out}; time {s['seconds']:.1f}s; peak memory {_bytes(s['peak_rss_bytes'])}")
    _saved(out, protocol, before, after)


@app.command()
@user_errors
def quantize(
    model: ModelArg,
    out: Annotated[Path, typer.Option(help="Directory to write the quantised checkpoint to (compressed-tensors pack-quantized; written atomically).")],
    bits: Annotated[int, typer.Option(help="Weight bits: 4 or 8 (weight-only; activations stay in the model dtype).")] = 4,
    group_size: Annotated[int | None, typer.Option(help="Weights per scale along the input dimension; 0 = one scale per output row. Default: the largest of 128/64/32/16/8 dividing every quantised width.")] = None,
    scope: Annotated[str, typer.Option(help="all: every decoder Linear (attention, routed and shared experts, dense MLPs; routers, embeddings, lm_head stay); experts: routed experts only.")] = "all",
    asymmetric: Annotated[bool, typer.Option("--asymmetric", help="Per-group zero points (asymmetric ranges) instead of symmetric ones.")] = False,
    method: Annotated[str, typer.Option(help="rtn: round-to-nearest, no data (fast); autoround: AutoRound's rounding tuned per decoder block on calibration text.")] = "rtn",
    iters: Annotated[int, typer.Option(help="autoround: tuning steps per decoder block.")] = 200,
    calib: CalibOpt = "bundled",
    samples: Annotated[int, typer.Option(help="autoround: number of calibration sequences.")] = 64,
    seq_len: SeqLenOpt = 256,
    seed: SeedOpt = 0,
    batch_size: BatchOpt = 8,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it already exists.")] = False,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    verify_checksums: VerifyOpt = False,
    streaming: StreamingOpt = "auto",
    threads: ThreadsOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Quantise weights to 4 or 8 bits (round-to-nearest or AutoRound, per group) and save a compressed-tensors checkpoint.

    Run it last, after prune/slim: it reads the full-precision model. Round-to-nearest streams
    a large checkpoint (one decoder layer read, quantised and written at a time); AutoRound
    holds the model in memory. The result loads with transformers (compressed-tensors
    installed) and vLLM; non-uniform checkpoints keep their generated remote code, and families
    that fuse experts on disk (gpt_oss, granitemoe, ...) get it: their experts are packed one
    weight per expert.
    """
    from .data.batches import CalibrationSpec
    from .io.load import resolve_model
    from .io.save import check_output_dir
    from .slimming.quantize import check_quantize_options
    from .slimming.quantize import quantize as quantize_model

    check_quantize_options(bits, scope, method, group_size)
    _require_positive(iters=iters)
    spec = CalibrationSpec(calib, samples, seq_len, seed, batch_size)
    if method == "autoround":
        spec.validate()
    resolve_model(model)  # a missing directory fails now, with its own message
    _verify(model, verify_checksums)
    if dry_run:
        from .dry_run import dry_run_quantize

        dry_run_quantize(model, out, overwrite, bits, group_size, scope, not asymmetric, dtype, trust_remote_code, method, spec)
        return
    check_output_dir(out, overwrite, [model])
    with _runtime(threads):
        result = quantize_model(
            model, out, bits, group_size, scope, not asymmetric, None, overwrite, method=method, calib=spec, iters=iters, device=device,
            trust_remote_code=trust_remote_code, streaming=_streaming(streaming), dtype=dtype,
        )
    s = result.summary
    _say(
        f"{s['method']} {s['bits']}-bit (group {s['group_size'] or 'per channel'}, {'symmetric' if s['symmetric'] else 'asymmetric'}) "
        f"{s['quantized_matrices']} matrices, {_human(s['quantized_params'])} weights; checkpoint "
        f"{_bytes(s['checkpoint_bytes_before'])} -> {_bytes(s['checkpoint_bytes'])} in {out}; time {s['seconds']:.1f}s"
    )
    _saved(out)


def main() -> None:  # pragma: no cover - console entry point
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun, rank 0 speaks for all
        os.environ["MOE_COMPRESS_QUIET"] = "1"
        out_console.quiet = True
    sys.exit(app())


if __name__ == "__main__":  # `torchrun ... -m moe_compress.cli prune ...`
    main()
