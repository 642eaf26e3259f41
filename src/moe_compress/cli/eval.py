"""`moe-compress eval`: perplexity, multiple-choice accuracy, size, memory and speed of a model, or of a
compressed model against its original."""

import json
from pathlib import Path
from typing import Annotated

import typer

from ..evaluate.protocol import DEFAULT_PROTOCOL, EvalProtocol
from ..inputs import writable_file
from ..progress import show
from .options import Loading, ModelArg, command


@command("eval")
def evaluate(
    model: ModelArg,
    sources: Annotated[list[str] | None, typer.Option("--ppl", help="Text to measure perplexity on; repeatable. 'bundled' gives one result per bundled domain (test split).")] = None,
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
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON to this file.")] = None,
    load: Loading = Loading(),
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
    from ..evaluate.models import Evaluation, evaluate_models
    from ..evaluate.speed import SpeedSettings
    from ..report.evaluation import eval_table

    timed = compare is not None if speed is None else speed
    settings = SpeedSettings(speed_batch, speed_prompt_len, speed_new_tokens, speed_repeats)
    request = Evaluation(model, sources or [], EvalProtocol(max_windows, seq_len), tasks, limit, batch_size, settings if timed else None, compare,
                         load.dtype, load.device, load.mode(), load.trust_remote_code, load.threads)
    writable_file(json_out, "json_out")
    load.check(model, compare)
    with load.session():
        report = evaluate_models(request)
    show(eval_table(report, request.protocol))
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
