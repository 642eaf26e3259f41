"""`moe-compress eval`: perplexity, multiple-choice accuracy, size, memory and speed of a model, or of a
compressed model against its original."""

import json

from ..evaluate.models import EvaluationSettings
from ..progress import show
from .options import Loading, ModelArg, command, settings_options

Options = settings_options(EvaluationSettings, flags={"seq_len": ("--seq-len", "--eval-seq-len"), "max_windows": ("--max-windows", "--eval-windows")})


@command("eval")
def evaluate(
    model: ModelArg,
    given: Options = Options(),
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
    from ..evaluate.models import evaluate_models
    from ..inputs import writable_file
    from ..report.evaluation import eval_table
    request = given.request(model, load)
    writable_file(given.json_out, "json_out")
    load.check(model, given.compare)
    with load.session():
        report = evaluate_models(request)
    show(eval_table(report, request.protocol))
    if given.json_out is not None:
        given.json_out.write_text(json.dumps(report, indent=2) + "\n")
