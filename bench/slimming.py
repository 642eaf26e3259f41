"""Expert slimming, quantisation and recipes on the reference models (issue #6).

Variants, each on a fresh copy of the original model:
  * weight sparsity on the routed experts: magnitude, Wanda and SparseGPT at 50 % unstructured
    and 2:4, calibrated on 32 mixed sequences;
  * weight-only quantisation (compressed-tensors pack-quantized) at 4 and 8 bits of every
    decoder Linear, round-to-nearest and AutoRound (20 tuning steps per block on the 32
    calibration sequences), measured as the checkpoint reloads (what users run);
  * every example recipe in recipes/ whose model is this one (but CD-MoE's, see below), run end to end, its output
    checkpoint reloaded and measured the same way.
Quality as bench/pruning.py (per-domain test perplexity, all `moec` questions); cost: parameters,
bytes and tokens/s against the original, interleaved in one process.

Bytes: "stored" is what the checkpoint holds (a sparse matrix is still stored dense here,
since transformers has no sparse checkpoint format); "effective" counts sparsified matrices
in compressed-tensors' sparse-bitmask layout (non-zero values + one bit per weight), the size a
sparse format would give; for quantised checkpoints both are the checkpoint's bytes.

    python bench/slimming.py --model ref-mixtral --model ref-deepseek   # -> bench/results/slimming_<model>.json, slimming.md
    python bench/slimming.py --model ref-mixtral --variants quantize-w4,autoround-w4 --rerun   # re-measure a subset
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import yaml
from common import RESULTS, Bench, EvalSettings, Variant, fidelity_columns, markdown_table, mc_column, mean_ppl, overview_plot

from moe_compress import get_adapter, load_model, model_size, quantize, run_recipe, slim
from moe_compress.arch.size import checkpoint_bytes

SETTINGS = EvalSettings(mc_limit=100, speed=True)
AUTOROUND_ITERS = 20  # AutoRound's default is 200: one block takes ~10 s per step on this shared 2-core machine
RECIPES = Path(__file__).resolve().parent.parent / "recipes"
SPARSITY = [("magnitude", "50%"), ("wanda", "50%"), ("sparsegpt", "50%"), ("magnitude", "2:4"), ("wanda", "2:4"), ("sparsegpt", "2:4")]
# condense-finetune.yaml is CD-MoE + fine-tuning, which bench/structural.py measures (its search
# alone takes ~15 min on one core of this machine).
SKIPPED_RECIPES = ("condense-finetune",)


def _effective_bytes(model) -> int:
    """Bytes if every matrix with zeros were stored as bitmask + non-zero values."""
    total = 0
    for parameter in model.parameters():
        zeros = int((parameter == 0).sum()) if parameter.dim() >= 2 else 0
        if zeros * 8 > parameter.numel():  # more than 1/8 zeros: the bitmask pays for itself
            total += (parameter.numel() - zeros) * parameter.element_size() + parameter.numel() // 8
        else:
            total += parameter.numel() * parameter.element_size()
    return total


def _sparsity_variant(method: str, pattern: str, batches) -> Variant:
    def build(model, tokenizer):
        options = {"sparsity": 0.5} if pattern == "50%" else {"nm": pattern}
        result = slim(model, method, calib=None if method == "magnitude" else batches, tokenizer=tokenizer, **options)
        return {"sparsity_reached": {k: round(v["sparsity"], 4) for k, v in result.summary["reached"].items()},
                "effective_bytes": _effective_bytes(model)}

    return Variant(f"{method}-{pattern}", build, {"family": f"{method} {'unstructured' if pattern == '50%' else 'N:M'}", "kind": "slim"})


def _reloaded(directory: Path, params: int) -> dict:
    """The checkpoint as users load it; `params` is the logical count (before packing)."""
    model, _ = load_model(directory)
    size = checkpoint_bytes(directory)
    quantised = getattr(model.config, "quantization_config", None) is not None
    return {"model": model, "params": params, "checkpoint_bytes": size, "effective_bytes": size if quantised else _effective_bytes(model)}


def _quantize_variant(bits: int, scratch: Path, method: str = "rtn", batches=None) -> Variant:
    """RTN (`quantize-w<bits>`) or AutoRound (`autoround-w<bits>`, tuned on the bench's calibration batches)."""

    def build(model, tokenizer):
        options = {"method": method, "calib": batches, "iters": AUTOROUND_ITERS} if method == "autoround" else {}
        result = quantize(model, scratch / f"{method}-w{bits}", bits=bits, tokenizer=tokenizer, overwrite=True, **options)
        return {**_reloaded(result.output_dir, model_size(model, get_adapter(model)).total), "group_size": result.summary["group_size"],
                "autoround": result.summary["autoround"]}

    name = f"quantize-w{bits}" if method == "rtn" else f"autoround-w{bits}"
    tags = {"family": "quantize (rtn)" if method == "rtn" else "quantize (autoround)", "kind": "quantize", "bits": bits, "method": method}
    return Variant(name, build, {**tags, **({"plot_group": "autoround"} if method == "autoround" else {})})


def _recipe_variant(path: Path, scratch: Path) -> Variant:
    def build(model, tokenizer):
        recipe = yaml.safe_load(path.read_text())
        recipe["evaluate"] = {"ppl": None}  # measured below, like every other variant
        report = run_recipe(recipe, out=scratch / path.stem, overwrite=True)
        return _reloaded(scratch / path.stem, report["rows"][-1]["params"])  # logical count, also for a quantize stage

    return Variant(f"recipe:{path.stem}", build, {"family": "recipe", "kind": "recipe", "recipe": path.name})


def run(model_name: str, only: set[str] | None = None, rerun: bool = False) -> None:
    bench = Bench(model_name, SETTINGS, RESULTS / f"slimming_{model_name}.json")
    batches = bench.calibration("bundled", samples=32)

    def measure(variant: Variant) -> None:
        if only is not None and variant.name not in only and variant.name != "original":  # the table's reference, always
            return
        if rerun and variant.name in bench.done:  # measured again under the current protocol
            bench.rows = [row for row in bench.rows if row["variant"] != variant.name]
            bench.done.discard(variant.name)
        bench.run(variant)

    measure(Variant("original", lambda m, t: {"effective_bytes": _effective_bytes(m)}, {"family": "original"}))
    for method, pattern in SPARSITY:
        measure(_sparsity_variant(method, pattern, batches))
    with tempfile.TemporaryDirectory(prefix="moec-bench-") as scratch:
        for bits in (8, 4):
            measure(_quantize_variant(bits, Path(scratch)))
            measure(_quantize_variant(bits, Path(scratch), "autoround", batches))
        for path in sorted(RECIPES.glob("*.yaml")):
            if yaml.safe_load(path.read_text()).get("model") == model_name and path.stem not in SKIPPED_RECIPES:
                measure(_recipe_variant(path, Path(scratch)))


def report() -> None:
    lines = ["# Expert slimming, quantisation and recipes", "",
             "Command: `python bench/slimming.py --model ref-mixtral --model ref-deepseek`; rows under the evaluation protocol so far: "
             "`python bench/slimming.py --model ref-deepseek --model ref-mixtral --variants quantize-w4,autoround-w4 --no-mc`. "
             "Quality: test-split perplexity (windows x tokens per domain as recorded under each model), MC accuracy over the first 100 questions of each of the 4 `moec` tasks (chance 0.25). Sparsity on routed experts, "
             "32 calibration sequences. Stored bytes: the checkpoint as written (sparse matrices stay dense); effective: "
             "sparse matrices as bitmask + non-zeros. Speed: same process, interleaved with the original "
             "(batch 4 x 128-token prompts, 16 new tokens), ratio > 1 is faster. KL / top-1: fidelity to the original on the perplexity windows "
             "('-' for rows recorded before it was measured). autoround-w*: `quantize --method autoround` (auto-round 0.16.1, "
             f"{AUTOROUND_ITERS} steps per block), the same format and size as quantize-w*.", ""]
    for path in sorted(RESULTS.glob("slimming_*.json")):
        data = json.loads(path.read_text())
        rows = sorted(data["rows"], key=lambda r: r["variant"] != "original")  # the reference first
        domains = list(rows[0]["perplexity"])
        columns = [("variant", lambda r: r["variant"]), ("params (M)", lambda r: f"{r['params'] / 1e6:.2f}"),
                   ("stored MiB", lambda r: f"{r.get('checkpoint_bytes', r['bytes']) / 2**20:.2f}"),
                   ("effective MiB", lambda r: f"{r['effective_bytes'] / 2**20:.2f}")]
        columns += [(f"ppl {d}", lambda r, d=d: f"{r['perplexity'][d]:.2f}") for d in domains]
        columns += [("mean ppl", lambda r: f"{mean_ppl(r):.2f}"), *fidelity_columns(), mc_column(),
                    mc_column("acc_norm"),
                    ("prefill x", lambda r: f"{r['speed']['prefill_ratio']:.2f}" if "speed" in r else "-"),
                    ("decode x", lambda r: f"{r['speed']['decode_ratio']:.2f}" if "speed" in r else "-"),
                    ("compress s", lambda r: f"{r['compress_seconds']:.1f}")]
        recorded = data.get("settings", {})
        lines += [f"## {data['model']}", "", f"Protocol: {recorded.get('ppl_windows')} windows x {recorded.get('seq_len')} tokens per domain.", "",
                  markdown_table(rows, columns)]
    (RESULTS / "slimming.md").write_text("\n".join(lines) + "\n")
    overview_plot(RESULTS / "quality_vs_size.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", default=[], help="bundled model name; repeatable")
    parser.add_argument("--report", action="store_true", help="only rebuild the markdown from recorded results")
    parser.add_argument("--variants", help="comma-separated variant names to run (default: all)")
    parser.add_argument("--rerun", action="store_true", help="measure the selected variants again even if recorded")
    parser.add_argument("--no-mc", action="store_true", help="skip the multiple-choice tasks (their rows show '-'); for quick runs")
    args = parser.parse_args()
    SETTINGS.mc = not args.no_mc
    for name in args.model:
        run(name, set(args.variants.split(",")) if args.variants else None, args.rerun)
    report()
