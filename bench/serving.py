"""Where moe-compress's outputs serve today (issue 23): every output kind through every loader that runs here.

The project promises checkpoints that "load anywhere"; this bench checks which loaders take which
output, on the bundled reference models. Each output kind is made from the same model with the
Python API (the CLI's code paths), small calibration (16 x 128 bundled tokens, seed 0), 25 %:

* uniform REAP prune (layer budget), global REAP (non-uniform), MoNE (global: pruned experts
  become constant "novices") in its default output and in the expert-substitution format (the
  family's architecture kept, each novice one stored constant: the format vLLM PR #50415 reads),
  HC-SMoE merge (layer budget, so uniform), `quantize --bits 4` (round-to-nearest, on the
  original), and mixed bits (the same quantisation with `expert_bits`: one width per MoE layer,
  and widths per expert within a layer). The original checkpoint is the baseline row.

For each output: its weight bytes (the model's *.safetensors files), what its config says (model_type,
auto_map, quantization_config, per_layer_config) and each loader's outcome, every loader in a
fresh process:

* transformers 5.23 (ours) `AutoModelForCausalLM.from_pretrained(path)`, plain and with
  `trust_remote_code=True`, with `moe_compress` made unimportable, so nothing of ours helps;
  compressed-tensors 0.20 is installed, so the 4-bit output is the compressed-tensors check.
  Logits on a fixed prompt are compared with the in-memory model the compressor produced (the
  quantised output, which has no in-memory twin, with the original's).
* llama.cpp's `convert_hf_to_gguf.py --outtype f16`, from the llama-cpp-python sdist on the
  package registry (pinned `LLAMA_CPP_PYTHON`; the sdist vendors llama.cpp at a recorded commit,
  with its `gguf-py`), run in a separate virtual environment this script creates (`--venv`,
  default ~/.cache/moe_compress/venvs/llama-cpp-python-<version>) with the converter's pinned
  requirements, torch being the local CPU wheel. A GGUF it writes is read back with that `gguf`
  package (architecture, expert count, tensors). The same environment's transformers (the
  converter's pin, 4.x) is tried as a plain loader too.
* llama.cpp's runtime, the same commit: `--build-llama-cpp SECONDS` compiles only its `llama` shared
  library, once, into ~/.cache/moe_compress/llama.cpp-<commit> (bench/llama_cpp_runtime.py); with it
  built, each GGUF goes through llama-cpp-python's `Llama(logits_all=True).eval(ids)` (the sdist's
  own bindings on that library): every position's logits of the prompt compared with the reference
  and with transformers 5.23 loading the checkpoint the GGUF came from in float32 (max abs
  difference, top-1 agreement), and the GGUF re-quantised with the library's `llama_model_quantize`
  (Q4_0), its bytes and the same comparison; plus a probe of per-layer expert counts (per_layer_probe).
  `--llama-cpp-forward` fills just those columns for the rows recorded in results/serving.json,
  from the GGUFs the recording run left in --scratch.
* vLLM: not installed anywhere; what its wheel requires is read from the registry's metadata
  (`pip install --dry-run`, nothing downloaded but metadata) and recorded, and each kind gets the
  verdict its config and vLLM's loader code give (`VLLM_VERDICTS`, with the sources read).

    python bench/serving.py --model ref-mixtral --model ref-deepseek   # -> results/serving.json, serving.md
    python bench/serving.py --model ref-mixtral --kind "mixed bits, per layer (rtn)"   # only that kind, into the same results
    python bench/serving.py --build-llama-cpp 2400 --llama-cpp-forward   # build llama.cpp's library, run the recorded GGUFs through it
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from moe_compress import compress, get_adapter, load_model, model_size, quantize
from moe_compress.data import CalibrationSpec, calibration_batches
from moe_compress.source.load import resolve_model

import llama_cpp_runtime

RESULTS = Path(__file__).parent / "results"
LLAMA_CPP_PYTHON = "0.3.36"
#: convert_hf_to_gguf's requirements (vendor/llama.cpp/requirements/requirements-convert_*.txt of
#: that sdist) pinned, but torch: theirs is 2.11 from PyTorch's own CPU index, which this machine
#: cannot reach; PyPI's Linux torch is the CUDA build, so the local CPU wheel 2.13.0 stands in.
CONVERTER_PINS = ["torch==2.13.0", "transformers==4.57.6", "numpy==2.2.6", "sentencepiece==0.2.1", "protobuf==4.25.8"]
DEFAULT_VENV = Path.home() / ".cache" / "moe_compress" / "venvs" / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
DEFAULT_SCRATCH = Path.home() / ".cache" / "moe_compress" / "bench-serving"
#: where llama.cpp's library is built, one directory per llama.cpp commit
LLAMA_CPP_BUILDS = Path.home() / ".cache" / "moe_compress"
#: kind -> (method, budget, options) for the expert-compressing kinds, all at RATIO
PRUNED_KINDS = {
    "uniform prune (reap, layer)": ("reap", "layer", {}),
    "global prune (reap, global)": ("reap", "global", {}),
    "MoNE (global)": ("mone", "global", {}),
    "MoNE expert-substitution (global)": ("mone", "global", {"output_format": "expert-substitution"}),
    "merge (hc-smoe, layer)": ("hc-smoe", "layer", {}),
}
#: kind -> `quantize` keywords beside bits=4 for the quantised kinds, made from the original. The
#: layers named are MoE layers in both reference models (ref-deepseek's layer 0 is dense).
QUANTIZED_KINDS = {
    "4-bit (rtn)": {},
    "mixed bits, per layer (rtn)": {"expert_bits": {1: 8, 3: 16}},
    "mixed bits, per expert (rtn)": {"expert_bits": {2: {0: 8, 1: 16}, 4: {3: 8}}},
}
KINDS = ["original", *PRUNED_KINDS, *QUANTIZED_KINDS]
RATIO = 0.25
CALIBRATION = CalibrationSpec("bundled", samples=16, seq_len=128, seed=0)
PROMPT = "The history of the river begins in the mountains, where"
#: What vLLM would do with each kind, read from its loader code and PRs (vLLM cannot run here: see
#: vllm_evidence). kind -> (verdict, why). Sources: vLLM's compressed-tensors MoE scheme choice
#: (vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors_moe/
#: compressed_tensors_moe.py, `CompressedTensorsMoEMethod.get_moe_method`, read at commit 0043d6b5;
#: `CompressedTensorsConfig.get_scheme_dict` in compressed_tensors.py beside it: `ignore` first, then
#: the first matching target, a group without its own format taking the config's), vllm#47154
#: (merged), vllm#36512 (open), vllm#50415 (open).
VLLM_SCHEME = ("vLLM picks one compressed-tensors scheme per fused MoE layer, the one its config gives expert 0's "
               "projections (`CompressedTensorsMoEMethod.get_moe_method` looks up `<layer>.0.gate_proj/up_proj/down_proj` "
               "only; its TODO: \"use expert_mapping and check all layer numbers\")")
#: Why the mixed-bits outputs name our architecture, in the verdicts.
GENERATED = ("architecture `MoECompressForCausalLM`, in no vLLM registry: the output carries generated code because "
             "transformers 5.23's compressed-tensors path dequantises all routed experts with one scheme")
VLLM_VERDICTS = {
    "original": ("expected to load", "stock architecture and config"),
    "uniform prune (reap, layer)": ("expected to load", "stock architecture; the config's expert count is the same in every layer"),
    "merge (hc-smoe, layer)": ("expected to load", "stock architecture; the config's expert count is the same in every layer"),
    "global prune (reap, global)": (
        "no, today", "its architecture `MoECompressForCausalLM` is in no vLLM registry; the per-layer expert counts in "
        "`per_layer_config` are what vLLM's heterogeneous loader AnyModel reads (vllm#36512, open)"),
    "MoNE (global)": (
        "no", "`MoECompressForCausalLM` with novices as extra modules: no engine reads this form; the expert-substitution "
        "output is the one meant for vLLM"),
    "MoNE expert-substitution (global)": (
        "only with vllm#50415 (open)", "the family's own architecture and model_type, full routers, retained experts under "
        "their original ids and `compression_config.transform_config.expert_substitution` naming each constant: the format "
        "that PR reads. Stock vLLM's class for the family has no parameter for the `expert_replacements.*.value` tensors "
        "and no weights for the substituted experts (transformers 4.57.6 plain, above, loads it that way: experts missing)"),
    "4-bit (rtn)": (
        "expected to load (GPU)", "one W4A16 symmetric int pack-quantized scheme for every expert, group size 64 (ref-mixtral) "
        "or 32 (ref-deepseek): the bits (4, 8), format (pack-quantized) and group sizes (-1, 32, 64, 128) vLLM's WNA16 "
        "Marlin MoE method accepts"),
    "mixed bits, per layer (rtn)": (
        "no as written; its quantization_config alone would fit (not verified)", f"{GENERATED}. The config groups "
        f"themselves are what vLLM reads: {VLLM_SCHEME}, and here every layer's experts share one width, so each layer "
        "finds its own group (int8 grouped experts run on Marlin since vllm#47154, merged, written for models with INT4 "
        "and INT8 layers); a layer left at 16 bits is `ignore`d and gets the unquantised MoE method. With the family's "
        "model_type and architecture in config.json it should load; nobody has run that"),
    "mixed bits, per expert (rtn)": (
        "no", f"{GENERATED}; and even with the family's architecture, {VLLM_SCHEME}: a layer whose experts differ in width "
        "gets expert 0's scheme for all of them, so the other experts' packed tensors and scales do not fit it"),
}
#: what pip-installing the whole llama-cpp-python sdist gave here, before llama_cpp_runtime built the library alone
PIP_BUILD_TRIED = ("tried on 2026-12-06: CPU-only build of the sdist, no tools/examples/server, 2 jobs; stopped after 23 min "
                   "with 65 object files of the ~200 C++ sources compiled, on this 2-core machine at load average ~10")
PLAIN_OLD = "transformers 4.57.6 (converter venv)"
WORKERS = 7
CHILD_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
CHILD_ENV.pop("PYTHONPATH", None)  # children see no source tree of ours

# Loads a checkpoint the way a user would, with moe_compress unimportable, and compares its logits
# on the prompt with the reference the compressor's in-memory model gave. Prints "RESULT{json}".
LOAD_RUNNER = textwrap.dedent(
    """
    import json, sys
    sys.modules["moe_compress"] = None  # importing it now raises: the checkpoint must stand alone
    import torch, transformers
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)
    path, trust, reference = sys.argv[1], sys.argv[2] == "1", torch.load(sys.argv[3])
    facts = {"transformers": transformers.__version__}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust, output_loading_info=True,
                                                           dtype=reference["dtype"])
        facts["class"] = type(model).__name__
        # transformers 5 writes rope_theta inside rope_parameters; 4.x reads only a top-level one
        facts["rope_theta"] = getattr(model.config, "rope_theta", None) or (getattr(model.config, "rope_parameters", None) or {}).get("rope_theta")
        facts["missing_keys"] = len(info["missing_keys"])
        facts["unexpected_keys"] = len(info["unexpected_keys"])
        with torch.no_grad():
            logits = model.eval()(input_ids=reference["ids"]).logits
        expected = reference["logits"]
        facts["logits_equal"] = bool(torch.equal(logits, expected))
        facts["max_abs_diff"] = float((logits.float() - expected.float()).abs().max())
        facts["top1_agreement"] = float((logits.argmax(-1) == expected.argmax(-1)).float().mean())
        facts["loaded"] = True
    except Exception as exc:
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        facts["loaded"] = False
        facts["error"] = f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"
    print("RESULT" + json.dumps(facts), flush=True)
    """
)

# transformers' float32 logits of a checkpoint (argv[1]) on the reference's ids (argv[2]), saved to argv[3]: what
# llama.cpp's forward of the GGUF made from that checkpoint is compared with, so that the bf16 rounding of the
# in-memory reference is not counted against llama.cpp. argv[4] "dequantize" loads a quantised checkpoint
# dequantised and casts it all to float32 (transformers keeps dequantised experts in bf16), as the converter
# dequantises; "default" loads it the way a user does (compressed-tensors' compressed forward). Prints RESULT{json}.
FLOAT32_RUNNER = textwrap.dedent(
    """
    import json, sys
    sys.modules["moe_compress"] = None
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    torch.set_num_threads(1)
    if sys.argv[4] == "dequantize":
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32,
                                                     quantization_config=CompressedTensorsConfig(dequantize=True)).float()
    else:
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    ids = torch.load(sys.argv[2])["ids"]
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model.eval()(input_ids=ids).logits}, sys.argv[3])
    print("RESULT" + json.dumps({"saved": True}), flush=True)
    """
)

# The converter with the two patches the bundled models' toy tokenizer needs, and nothing else: their
# tokenizer_config names transformers 5's generic class TokenizersBackend, unknown to the converter's
# transformers 4.x (map it to PreTrainedTokenizerFast), and llama.cpp identifies a BPE pre-tokenizer
# by hashing how it splits a test text, which it cannot know for our own 8k byte-level BPE (answer
# "gpt-2", the byte-level regex this tokenizer uses). The expert weights go through untouched.
TOY_TOKENIZER_SHIM = textwrap.dedent(
    """
    import runpy, sys
    from pathlib import Path
    import transformers
    transformers.TokenizersBackend = transformers.PreTrainedTokenizerFast
    converter = sys.argv[1]
    sys.path.insert(0, str(Path(converter).parent))
    from conversion.base import TextModel
    TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    sys.argv = sys.argv[1:]
    runpy.run_path(converter, run_name="__main__")
    """
)

# Reads a GGUF back with the gguf package (llama.cpp's runtime is bench/llama_cpp_runtime.py's runners).
GGUF_RUNNER = textwrap.dedent(
    """
    import json, sys
    from gguf import GGUFReader
    path = sys.argv[1]
    reader = GGUFReader(path)
    def field(name):
        f = reader.fields.get(name)
        if f is None:
            return None
        value = f.contents()
        return value
    arch = field("general.architecture")
    facts = {"architecture": arch, "tensors": len(reader.tensors), "expert_count": field(f"{arch}.expert_count"),
             "expert_used_count": field(f"{arch}.expert_used_count"), "block_count": field(f"{arch}.block_count"),
             "rope_freq_base": field(f"{arch}.rope.freq_base"), "expert_gating_func": field(f"{arch}.expert_gating_func"),
             "expert_tensor_shapes": sorted({str([int(d) for d in t.shape]) for t in reader.tensors if "_exps" in t.name})}
    print("RESULT" + json.dumps(facts), flush=True)
    """
)


def _one_line(text: str) -> str:
    """The line of a failed tool's output that names the problem: its last error line, else its last line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line.split(":")[0]]
    return (errors or lines or ["(no output)"])[-1][:300]


def _run(command: list[str], timeout: int = 600, env: dict | None = None) -> tuple[dict | None, str]:
    """(facts printed on a RESULT line or None, the one line saying why not)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env or CHILD_ENV, timeout=timeout, cwd="/")
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    for line in done.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line.removeprefix("RESULT")), ""
    return None, f"exit {done.returncode}: {_one_line(done.stderr or done.stdout)}"


# ---------------------------------------------------------------- the outputs


def _weight_bytes(directory: Path) -> int:
    """The model's safetensors files: not the plan's novice vectors (`moe_compress_plan.novices.safetensors`) saved beside MoNE's."""
    return sum(f.stat().st_size for f in directory.glob("*.safetensors") if not f.name.startswith("moe_compress_plan"))


def _config_facts(directory: Path) -> dict:
    config = json.loads((directory / "config.json").read_text())
    groups = (config.get("quantization_config") or {}).get("config_groups", {})
    return {"model_type": config.get("model_type"), "architectures": config.get("architectures"),
            "auto_map": sorted(config.get("auto_map", {})), "quantization_config": "quantization_config" in config,
            "bit_groups": sorted(group["weights"]["num_bits"] for group in groups.values()),
            "per_layer_config": "per_layer_config" in config,
            "expert_substitution": "expert_substitution" in ((config.get("compression_config") or {}).get("transform_config") or {})}


def _reference(model, ids: torch.Tensor, path: Path) -> None:
    """The logits `model` gives for the prompt, saved for the loaders to compare with."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.save({"ids": ids, "logits": logits, "dtype": str(model.dtype).removeprefix("torch.")}, path)


def make_outputs(model_name: str, scratch: Path, kinds: list[str]) -> dict[str, dict]:
    """The output `kinds` of `model_name` under `scratch`, with their reference logits; kind -> facts.
    The original's reference is always written: the quantised kinds are compared with it."""
    original, tokenizer = load_model(model_name)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    scratch.mkdir(parents=True, exist_ok=True)
    outputs = {"original": {"path": str(resolve_model(model_name)), "reference": str(scratch / "original.pt"),
                            "experts_per_layer": _experts(original)}}
    _reference(original, ids, scratch / "original.pt")
    pruned = [kind for kind in PRUNED_KINDS if kind in kinds]
    batches = calibration_batches(tokenizer, CALIBRATION) if pruned else None
    for kind in pruned:
        method, budget, options = PRUNED_KINDS[kind]
        out, reference = scratch / _slug(kind), scratch / f"{_slug(kind)}.pt"
        start = time.perf_counter()
        result = compress(copy.deepcopy(original), method=method, ratio=RATIO, budget=budget, calib=batches, tokenizer=tokenizer,
                          out=out, overwrite=True, cache_dir=False, options=options)
        _reference(result.model, ids, reference)
        shown = f", options={options!r}" if options else ""
        outputs[kind] = {"path": str(out), "reference": str(reference), "seconds": round(time.perf_counter() - start, 1),
                         "command": f"mc.compress({model_name!r}, method={method!r}, ratio={RATIO}, budget={budget!r}{shown})",
                         "experts_per_layer": _experts(result.model)}
    for kind in [kind for kind in QUANTIZED_KINDS if kind in kinds]:
        keywords = QUANTIZED_KINDS[kind]
        out = scratch / ("quantized-4bit" if not keywords else _slug(kind))
        start = time.perf_counter()
        quantize(original, out, bits=4, tokenizer=tokenizer, overwrite=True, **keywords)
        shown = "".join(f", {key}={value!r}" for key, value in keywords.items())
        outputs[kind] = {"path": str(out), "reference": str(scratch / "original.pt"), "reference_is": "original (no in-memory twin)",
                         "seconds": round(time.perf_counter() - start, 1), "command": f"mc.quantize({model_name!r}, bits=4{shown})",
                         "experts_per_layer": outputs["original"]["experts_per_layer"]}
    for facts in outputs.values():
        facts["weight_bytes"] = _weight_bytes(Path(facts["path"]))
        facts["config"] = _config_facts(Path(facts["path"]))
    return {kind: facts for kind, facts in outputs.items() if kind in kinds}


def _experts(model) -> list[int]:
    """Routed experts of each MoE layer, in layer order."""
    per_layer = model_size(model, get_adapter(model)).experts_per_layer
    return [per_layer[layer] for layer in sorted(per_layer)]


def _slug(kind: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in kind.lower()).strip("-").replace("--", "-")


# ---------------------------------------------------------------- the converter's environment


def llama_cpp_sources(cache: Path) -> tuple[Path, str]:
    """(vendor/llama.cpp of the pinned llama-cpp-python sdist, the llama.cpp commit it vendors), fetched once."""
    root = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    if not (root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(cache)], check=True)
        with tarfile.open(cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as archive:
            archive.extractall(cache, filter="data")
    commit = (root / ".git" / "modules" / "vendor" / "llama.cpp" / "HEAD").read_text().strip()
    return root, commit


def ensure_venv(venv: Path, llama_cpp: Path) -> Path:
    """The converter's virtual environment, created on first use; returns its python."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *CONVERTER_PINS, str(llama_cpp / "vendor" / "llama.cpp" / "gguf-py")],
                       check=True)
    return python


def vllm_evidence(python: Path, scratch: Path) -> dict:
    """What vLLM's newest wheel needs, from the registry's metadata only (nothing is installed)."""
    report = scratch / "vllm-report.json"
    done = subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "--quiet", "--no-deps", "--ignore-installed",
                           "--report", str(report), "vllm"], capture_output=True, text=True, env=CHILD_ENV)
    if done.returncode != 0:
        return {"resolved": False, "error": _one_line(done.stderr)}
    (item,) = json.loads(report.read_text())["install"]
    needs = [r for r in item["metadata"].get("requires_dist", []) if r.split(";")[0].replace(" ", "").startswith(("torch=", "torch>", "torch<", "torch~"))]
    facts = {"resolved": True, "version": item["metadata"]["version"], "wheel": item["download_info"]["url"].rsplit("/", 1)[-1],
             "torch_requirement": needs}
    pinned = next((r.split(";")[0].replace(" ", "") for r in needs if "==" in r), None)
    if pinned:  # does that torch resolve to CUDA packages here? (metadata only, again)
        torch_report = scratch / "vllm-torch-report.json"
        done = subprocess.run([str(python), "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed", "--report", str(torch_report),
                               pinned], capture_output=True, text=True, env=CHILD_ENV)
        if done.returncode != 0:
            facts["torch_resolution"] = _one_line(done.stderr)
        else:
            names = [i["metadata"]["name"] for i in json.loads(torch_report.read_text())["install"]]
            facts["torch_resolution"] = f"{pinned} resolves with {sum(n.startswith('nvidia') for n in names)} nvidia-* packages (CUDA build)"
    return facts


# ---------------------------------------------------------------- the loaders


GGUF = "convert_hf_to_gguf f16"
GGUF_TOY = "convert_hf_to_gguf f16, toy tokenizer accepted"


def _convert(python: Path, command: list[str], gguf: Path, scripts: Path, facts: dict) -> dict:
    """One converter run writing `gguf`, and what reading the GGUF back says."""
    gguf.unlink(missing_ok=True)
    start = time.perf_counter()
    _, why = _run([str(python), *command, facts["path"], "--outfile", str(gguf), "--outtype", "f16"])
    converted = {"seconds": round(time.perf_counter() - start, 1)}
    if not gguf.is_file():
        return converted | {"converted": False, "error": why}
    return converted | {"converted": True, **_read_gguf(python, gguf, scripts, facts)}


def _read_gguf(python: Path, gguf: Path, scripts: Path, facts: dict) -> dict:
    read, why_not = _run([str(python), str(scripts / "read_gguf.py"), str(gguf)])
    found = {"gguf_bytes": gguf.stat().st_size, **(read or {"read_error": why_not})}
    found["expert_count_matches"] = sorted(set(facts["experts_per_layer"])) == [found.get("expert_count")]
    return found


#: transformers' float32 load mode -> the name its comparison has in the results
FLOAT32 = {"default": "transformers_float32", "dequantize": "transformers_float32_dequantized"}


def run_llama_cpp(ours: str, theirs: Path, lib: Path, gguf: Path, scripts: Path, facts: dict, read: dict) -> dict:
    """llama.cpp's forward of `gguf`, and of its re-quantisation, against transformers' float32 logits and the reference.

    transformers 5.23 loads the checkpoint the GGUF was converted from in float32 (for a quantised
    output: the quantised model, which the reference, the original, is not; both as a user loads it
    and dequantised, as the converter reads it), so the comparison measures llama.cpp and not the bf16
    rounding of the in-memory reference. A deepseek2 GGUF
    without `expert_gating_func` also runs with it overridden to sigmoid, DeepSeek-V3's router:
    llama.cpp falls back to softmax there (src/models/deepseek2.cpp), and the run says what that costs.
    """
    env = llama_cpp_runtime.environment(CHILD_ENV, lib)
    references, errors = [f"reference={facts['reference']}"], {}
    for mode in ("default", "dequantize") if facts["config"]["quantization_config"] else ("default",):
        name = FLOAT32[mode]
        logits = gguf.with_suffix(f".{name}.pt")
        saved, errors[name] = _run([ours, str(scripts / "float32.py"), facts["path"], facts["reference"], str(logits), mode])
        references += [f"{name}={logits}"] if saved else []

    def forward(path: Path, *overrides: str) -> dict:
        result, why_not = _run([str(theirs), str(scripts / "llama_forward.py"), str(path), *references, *overrides], env=env)
        return (result or {"forward": "failed", "error": why_not}) | {"float32_errors": {k: v for k, v in errors.items() if v}}

    sigmoid = [f"override:deepseek2.expert_gating_func={llama_cpp_runtime.GATING_SIGMOID}"] \
        if read.get("architecture") == "deepseek2" and read.get("expert_gating_func") is None else []
    found = {"llama_cpp": forward(gguf)}
    if sigmoid:
        found["llama_cpp"]["gating_overridden_to_sigmoid"] = forward(gguf, *sigmoid)
    quantized = gguf.with_name(f"{gguf.stem}-{llama_cpp_runtime.QUANT_TYPE}.gguf")
    quantized.unlink(missing_ok=True)
    start = time.perf_counter()
    result, why = _run([str(theirs), str(scripts / "llama_quantize.py"), str(gguf), str(quantized), str(llama_cpp_runtime.QUANT_FTYPE)], env=env)
    if not (result and result["status"] == 0 and quantized.is_file()):
        return found | {"llama_quantize": {"type": llama_cpp_runtime.QUANT_TYPE, "error": why or result}}
    found["llama_quantize"] = {"type": llama_cpp_runtime.QUANT_TYPE, "seconds": round(time.perf_counter() - start, 1),
                               "gguf_bytes": quantized.stat().st_size, "said": result["said"], **forward(quantized, *sigmoid)}
    return found


def _write_runners(scripts: Path) -> None:
    """The runner scripts, alone in `scripts` (a stale gguf.py there once shadowed the package)."""
    shutil.rmtree(scripts, ignore_errors=True)
    scripts.mkdir(parents=True)
    (scripts / "load.py").write_text(LOAD_RUNNER)
    (scripts / "float32.py").write_text(FLOAT32_RUNNER)
    (scripts / "read_gguf.py").write_text(GGUF_RUNNER)  # not gguf.py: that would shadow the package
    (scripts / "toy_tokenizer.py").write_text(TOY_TOKENIZER_SHIM)
    (scripts / "llama_forward.py").write_text(llama_cpp_runtime.FORWARD_RUNNER)
    (scripts / "llama_quantize.py").write_text(llama_cpp_runtime.QUANTIZE_RUNNER)
    (scripts / "per_layer.py").write_text(llama_cpp_runtime.PER_LAYER_RUNNER)


def _ggufs(kind: str, scratch: Path) -> list[tuple[str, Path]]:
    """(loader, the GGUF it writes) for the converter as written and with the toy tokenizer accepted."""
    return [(GGUF, scratch / f"{_slug(kind)}.gguf"), (GGUF_TOY, scratch / f"{_slug(kind)}-toy.gguf")]


def try_loaders(outputs: dict[str, dict], ours: str, theirs: Path, sdist: Path, scratch: Path, lib: Path | None) -> None:
    """Each loader on each output, recorded in the output's facts under "loaders"; llama.cpp's runtime too when `lib` is built.

    Every loader is a process of its own that mostly waits on this shared machine (imports), so
    the outputs are tried WORKERS at a time.
    """
    scripts = scratch / "runners"
    _write_runners(scripts)
    converter = str(sdist / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py")

    def one(kind: str) -> None:
        facts = outputs[kind]
        loaders = {}
        for name, python, trust in (("transformers", ours, "0"), ("transformers trust_remote_code", ours, "1"),
                                    (PLAIN_OLD, str(theirs), "0")):
            result, why = _run([python, str(scripts / "load.py"), facts["path"], trust, facts["reference"]])
            loaders[name] = result or {"loaded": False, "error": why}
        for result in loaders.values():  # the scratch path says nothing; name the directory as a user would
            if "error" in result:
                result["error"] = result["error"].replace(facts["path"], "<output>")
        for (name, gguf), command in zip(_ggufs(kind, scratch), ([converter], [str(scripts / "toy_tokenizer.py"), converter])):
            loaders[name] = _convert(theirs, command, gguf, scripts, facts)
            if "error" in loaders[name]:
                loaders[name]["error"] = loaders[name]["error"].replace(facts["path"], "<output>")
            if lib and loaders[name]["converted"]:
                loaders[name] |= run_llama_cpp(ours, theirs, lib, gguf, scripts, facts, loaders[name])
        facts["loaders"] = loaders
        print(f"{kind}: loaders tried", flush=True)

    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(one, [kind for kind, facts in outputs.items() if "path" in facts]))


def llama_cpp_columns(report: dict, ours: str, theirs: Path, scratch: Path, lib: Path) -> None:
    """llama.cpp's runtime on the GGUFs the recorded rows' run left in `scratch` (each read back again); nothing else is re-run.

    A GGUF whose size is not the recorded one is not run: it was not written by the recorded run. The
    original is the bundled model as this checkout resolves it (the recorded path may be another checkout's).
    """
    for model, outputs in report["models"].items():
        scripts = scratch / model / "gguf" / "runners"
        _write_runners(scripts)

        def one(kind: str) -> None:
            facts = outputs[kind] | ({"path": str(resolve_model(model))} if kind == "original" else {})
            for name, gguf in _ggufs(kind, scratch / model / "gguf"):
                result = facts["loaders"][name]
                for key in ("forward", "llama_cpp", "llama_quantize"):  # "forward": the old "not built here" note
                    result.pop(key, None)
                if not result.get("converted"):
                    continue
                if not gguf.is_file() or gguf.stat().st_size != result["gguf_bytes"]:
                    result["llama_cpp"] = {"forward": "not run", "error": f"{gguf} is not the recorded GGUF; re-record the row"}
                    continue
                result |= _read_gguf(theirs, gguf, scripts, facts)
                result |= run_llama_cpp(ours, theirs, lib, gguf, scripts, facts, result)
            print(f"{model} {kind}: llama.cpp tried", flush=True)

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(one, [kind for kind, facts in outputs.items() if "loaders" in facts]))


def per_layer_probe(report: dict, models: list[str], theirs: Path, scratch: Path, lib: Path) -> None:
    """What llama.cpp's loader says to per-layer expert counts, for each of `models` with a global prune and a uniform prune's GGUF in `scratch`.

    The converter refuses the non-uniform outputs, so llama.cpp never sees them; this writes the uniform
    prune's GGUF again with `<arch>.expert_count` set to the global prune's counts per layer (the
    metadata such an output would need; its tensors stay uniform) and runs it.
    """
    for model in models:
        uniform, plan = report["models"][model].get("uniform prune (reap, layer)"), report["models"][model].get("global prune (reap, global)")
        scripts, gguf = scratch / model / "gguf" / "runners", scratch / model / "gguf" / f"{_slug('uniform prune (reap, layer)')}-toy.gguf"
        if not (uniform and plan and gguf.is_file()):
            continue
        probe = gguf.with_name("per-layer-expert-count-probe.gguf")
        written, why = _run([str(theirs), str(scripts / "per_layer.py"), str(gguf), str(probe), ",".join(map(str, plan["experts_per_layer"]))])
        if not written:
            report.setdefault("llama_cpp_per_layer_probe", {})[model] = {"error": why}
            continue
        ran, why = _run([str(theirs), str(scripts / "llama_forward.py"), str(probe), f"reference={uniform['reference']}"],
                        env=llama_cpp_runtime.environment(CHILD_ENV, lib))
        report.setdefault("llama_cpp_per_layer_probe", {})[model] = {**written, **(ran or {"forward": "failed", "error": why})}


# ---------------------------------------------------------------- the report


def _cell_transformers(result: dict) -> str:
    if not result.get("loaded"):
        return f"fails: `{result.get('error', '?')}`"
    keys = "" if not (result["missing_keys"] or result["unexpected_keys"]) else f", {result['missing_keys']} missing / {result['unexpected_keys']} unexpected keys"
    if result["logits_equal"]:
        return f"loads{keys}, logits equal"
    return f"loads{keys}, logits differ (max abs {result['max_abs_diff']:.3g}, top-1 agree {result['top1_agreement']:.2f})"


def _cell_gguf(result: dict, experts: list[int]) -> str:
    if not result.get("converted"):
        return f"refused: `{result.get('error', '?')}`"
    if "read_error" in result:
        return f"wrote {result['gguf_bytes']:,} B; reading back failed: `{result['read_error']}`"
    match = "= the output's" if result["expert_count_matches"] else f"!= the output's {sorted(set(experts))}"
    return (f"{result['gguf_bytes']:,} B, arch {result['architecture']}, {result['tensors']} tensors, expert_count {result['expert_count']} {match}, "
            f"rope freq_base {result['rope_freq_base']:g}")


def _compared(run: dict) -> str:
    """How a llama.cpp forward's logits compare with transformers' float32 logits of the same checkpoint, and with the reference."""
    def one(name: str) -> str:
        return f"max abs {run[name]['max_abs_diff']:.3g}, top-1 agree {run[name]['top1_agreement']:.2f}"
    shown = "".join(f"vs transformers float32{label} {one(FLOAT32[mode])}; " for mode, label in (("default", ""), ("dequantize", " dequantized"))
                    if FLOAT32[mode] in run)
    failed = "".join(f"(transformers {name} failed: `{why}`) " for name, why in run.get("float32_errors", {}).items())
    return shown + failed + f"vs the reference {one('reference')}"


def _llama_refusal(run: dict) -> str:
    """llama.cpp's own first error line (the specific one; the later ones say only that loading failed), else the exception."""
    said = [line for line in run.get("llama_cpp_said") or [] if "error" in line.lower()] or run.get("llama_cpp_said") or []
    return f"refused: `{said[0] if said else run.get('error', '?')}`"


def _cell_llama(result: dict) -> str:
    if not result.get("converted"):
        return "- (no GGUF)"
    run = result.get("llama_cpp")
    if run is None:
        return "not run (llama.cpp's library not built; --build-llama-cpp)"
    if run["forward"] != "done":
        return _llama_refusal(run)
    shown = f"ran, {run['positions']} positions; {_compared(run)}"
    if "gating_overridden_to_sigmoid" in run:
        shown += f". No expert_gating_func in the GGUF (softmax used); overridden to sigmoid: {_compared(run['gating_overridden_to_sigmoid'])}"
    return shown


def _cell_llama_quantize(result: dict) -> str:
    if "llama_quantize" not in result:
        return "-"
    run = result["llama_quantize"]
    if "gguf_bytes" not in run:
        return f"failed: `{run['error']}`"
    said = "; ".join(" ".join(line.split()) for line in run["said"][1:])  # the quantiser's own summary, its column padding dropped
    size = f"{run['gguf_bytes']:,} B ({run['gguf_bytes'] / result['gguf_bytes']:.2f}x the f16 GGUF; {said})"
    overridden = " (gating overridden to sigmoid)" if run.get("overrides") else ""
    return f"{size}; {_compared(run) + overridden if run['forward'] == 'done' else _llama_refusal(run)}"


def _build_line(report: dict) -> str:
    """The llama.cpp build this run used (or why none), with its command, wall time and compiler."""
    record = report.get("llama_cpp_build")
    if not record:
        return f"not built ({PIP_BUILD_TRIED}; `--build-llama-cpp SECONDS` builds only the library)"
    line = (f"`{record['configure']}` then `{record['build']}` ({record['compiler']}; {record['date']}): {record['status']}, "
            f"{record['progress']}, {record['seconds']} s wall")
    return line + (f". {record['note']}" if record.get("note") else "")


def markdown(report: dict) -> str:
    lines = [f"# Serving: which loaders take which output (`{report['command']}`)", "",
             f"{report['machine']}; {report['date']}. Calibration {CALIBRATION.samples} x {CALIBRATION.seq_len} bundled tokens, "
             f"seed {CALIBRATION.seed}; {RATIO:.0%} of routed experts. Each loader runs in a fresh process with `moe_compress` made "
             f"unimportable; logits are on a {report['prompt_tokens']}-token prompt and compared with the in-memory model the "
             "compressor produced (the reference; quantised outputs: the original, as they have no in-memory twin). Weight bytes: the model's "
             "*.safetensors files (not the MoNE plan's novice vectors saved beside them).", "",
             f"* llama.cpp: `convert_hf_to_gguf.py` and `gguf-py` from the llama-cpp-python {LLAMA_CPP_PYTHON} sdist on the package "
             f"registry, which vendors llama.cpp commit `{report['llama_cpp_commit']}`; run in its own venv with "
             f"{', '.join(CONVERTER_PINS)} (torch: the local CPU wheel instead of the converter's pin 2.11.0 from PyTorch's index). "
             "'as written' runs it unchanged. The bundled models' tokenizer is a toy no converter knows (transformers 5's generic "
             "`TokenizersBackend` class in tokenizer_config, unknown to transformers 4.57; an 8k byte-level BPE whose pre-tokenizer hash "
             "llama.cpp cannot identify), so 'toy tokenizer accepted' runs the same converter with exactly those two checks patched "
             "(TokenizersBackend -> PreTrainedTokenizerFast, pre-tokenizer -> gpt-2, the byte-level regex it uses); the weights go through untouched. "
             "Each GGUF written is read back with `gguf` (architecture, tensors, `<arch>.expert_count`).",
             "* llama.cpp's runtime, same commit: only its `llama` shared library (with ggml's CPU backend) is built, and "
             "llama-cpp-python's own Python package from that sdist, pointed at it by `LLAMA_CPP_LIB_PATH`, runs "
             "`Llama(logits_all=True, n_threads=1).eval(ids)` on the 'toy tokenizer accepted' GGUF: the prompt's token ids in one batch, logits at "
             "every position, compared with transformers 5.23 loading the same checkpoint in float32 (so that the reference's bf16 rounding "
             "is not counted against llama.cpp; a quantised output twice: as a user loads it, compressed-tensors' compressed forward, and "
             "dequantized, as the converter reads it) and with the reference (the in-memory model in bf16; for a quantised output the "
             "original). The GGUF is then re-quantised with the library's `llama_model_quantize` (what `llama-quantize` calls) to "
             f"{llama_cpp_runtime.QUANT_TYPE} (not a K-quant: those need rows of 256 and these models' are 192 or 96 wide) and run the same way. "
             f"Build: {_build_line(report)}."
             + (f" Those two columns recorded on {report['llama_cpp_run']['date']} by `{report['llama_cpp_run']['command']}`, from the GGUFs "
                "the recording runs wrote (the same bytes as recorded)." if report.get("llama_cpp_run") else ""),
             f"* vLLM: {report['vllm_summary']} Its verdict for each kind, from the kind's config and vLLM's loader code, "
             "is the table after the results.",
             *[f"* Rows of {', '.join(added['kinds'])} ({', '.join(added['models'])}) added on {added['date']} by `{added['command']}`."
               for added in report.get("added", [])], ""]
    for model, outputs in report["models"].items():
        original = outputs["original"]["weight_bytes"]
        lines += [f"## {model}", "", "| output | how | weight bytes | vs original | model_type | auto_map | quantization_config | "
                  "per_layer_config | expert_substitution | experts/layer |", "|---|---|---:|---:|---|---|---|---|---|---|"]
        for kind, facts in outputs.items():
            c, experts = facts["config"], facts["experts_per_layer"]
            shown = str(experts[0]) if len(set(experts)) == 1 else "/".join(map(str, experts))
            groups = c.get("bit_groups", [])
            quantization = "-" if not c["quantization_config"] else f"groups of {', '.join(map(str, groups))} bits" if groups else "yes"
            lines.append(f"| {kind} | {'`' + facts['command'] + '`' if 'command' in facts else 'bundled'} | {facts['weight_bytes']:,} | "
                         f"{facts['weight_bytes'] / original:.2f} | {c['model_type']} | {', '.join(c['auto_map']) or '-'} | "
                         f"{quantization} | {'yes' if c['per_layer_config'] else '-'} | {'yes' if c.get('expert_substitution') else '-'} | {shown} |")
        lines += ["", "| output | transformers 5.23 plain | transformers 5.23 trust_remote_code | transformers 4.57.6 plain | "
                  "convert_hf_to_gguf f16, as written | convert_hf_to_gguf f16, toy tokenizer accepted | llama.cpp forward (f16 GGUF) | "
                  f"llama.cpp {llama_cpp_runtime.QUANT_TYPE} (llama_model_quantize) and its forward |",
                  "|---|---|---|---|---|---|---|---|"]
        for kind, facts in outputs.items():
            loaders = facts["loaders"]
            lines.append(f"| {kind} | {_cell_transformers(loaders['transformers'])} | {_cell_transformers(loaders['transformers trust_remote_code'])} | "
                         f"{_cell_transformers(loaders[PLAIN_OLD])} | {_cell_gguf(loaders[GGUF], facts['experts_per_layer'])} | "
                         f"{_cell_gguf(loaders[GGUF_TOY], facts['experts_per_layer'])} | {_cell_llama(loaders[GGUF_TOY])} | "
                         f"{_cell_llama_quantize(loaders[GGUF_TOY])} |")
        lines.append("")
    lines += ["## vLLM, per output kind (not run here)", "",
              "Read from the outputs' configs above and from vLLM's code and pull requests, not from a run: vLLM cannot be "
              "installed on this CPU-only machine (see the top). 'Expected to load' means the checkpoint is in a form vLLM's "
              "loader handles for other models, nothing more.", "", "| output | vLLM | why |", "|---|---|---|",
              *[f"| {kind} | {VLLM_VERDICTS[kind][0]} | {VLLM_VERDICTS[kind][1]} |" for kind in KINDS], "",
              "## What this means", "", *meaning(report), ""]
    return "\n".join(lines)


def meaning(report: dict) -> list[str]:
    """Which outputs serve where today, read off the results (one bullet per loader)."""
    def kinds(test) -> str:
        found = [f"{kind} ({model})" if len(report["models"]) > 1 else kind
                 for model, outputs in report["models"].items() for kind, facts in outputs.items()
                 if "loaders" in facts and kind != "original" and test(facts["loaders"])]
        return ", ".join(found) or "none"

    def loads(name: str):
        return lambda loaders: loaders[name].get("loaded") and loaders[name].get("top1_agreement", 0) > 0 and not loaders[name]["missing_keys"]

    def partly(name: str):
        return lambda loaders: loaders[name].get("loaded") and loaders[name]["missing_keys"]

    def exact(name: str):
        return lambda loaders: loaders[name].get("logits_equal")

    return [
        f"* transformers 5.23, plain `from_pretrained`, nothing of moe-compress installed: loads {kinds(loads('transformers'))}; "
        f"logits identical to the compressor's in-memory model: {kinds(exact('transformers'))}.",
        f"* transformers 5.23 with `trust_remote_code=True` (the generated modelling code shipped in the checkpoint): loads "
        f"{kinds(loads('transformers trust_remote_code'))}; identical logits: {kinds(exact('transformers trust_remote_code'))}.",
        f"* transformers 4.57.6, plain (users still on 4.x): loads {kinds(loads(PLAIN_OLD))}; identical logits: {kinds(exact(PLAIN_OLD))}. "
        f"Loads with weights missing, left at their random initialisation and no error: {kinds(partly(PLAIN_OLD))} (its auto_map is "
        "not used without trust_remote_code, so the family's own class loads it and finds no weights for the substituted experts). "
        f"{_rope_note(report)}",
        f"* llama.cpp's converter, as written: converts {kinds(lambda l: l[GGUF].get('converted'))}. With the toy tokenizer accepted: "
        f"converts {kinds(lambda l: l[GGUF_TOY].get('converted'))}; GGUF expert_count equal to the output's: "
        f"{kinds(lambda l: l[GGUF_TOY].get('expert_count_matches'))}. The as-written refusal of the outputs the patched run converts is "
        "the original bundled checkpoint's too: it comes from the input's tokenizer, not from compression; the refusals left after the "
        "patches are the outputs' own (see the cells).",
        f"* A quantised output converts by being dequantised: its f16 GGUF is {_quantised_growth(report)} its checkpoint's bytes, "
        "so the 4-bit saving does not carry into the GGUF (re-quantise with llama.cpp's own tools: the last column).",
        *_llama_meaning(report, kinds),
        f"* vLLM: {report['vllm_summary']}",
    ]


def _llama_meaning(report: dict, kinds) -> list[str]:
    """The llama.cpp runtime's bullets: which GGUFs it ran, and how close their logits came to transformers' float32 ones."""
    def run(loaders: dict) -> dict:
        return loaders[GGUF_TOY].get("llama_cpp") or {}

    def top1(forward: dict, name: str = FLOAT32["default"]) -> bool:
        return forward.get("forward") == "done" and forward.get(name, {}).get("top1_agreement") == 1.0

    def closest(forward: dict) -> float:
        return min(forward[name]["max_abs_diff"] for name in FLOAT32.values() if name in forward)

    rows = [(model, kind, run(f["loaders"])) for model, o in report["models"].items() for kind, f in o.items() if run(f["loaders"]).get("forward") == "done"]
    if not rows:
        return ["* llama.cpp's runtime: not run (its library is not built here, see above)."]
    plain = [(m, k, r.get("gating_overridden_to_sigmoid", r)) for m, k, r in rows]  # deepseek2: as its router really is
    bullets = [
        f"* llama.cpp's own forward (f16 GGUF) runs: {kinds(lambda l: run(l).get('forward') == 'done')}; it refuses: "
        f"{kinds(lambda l: run(l).get('forward') == 'failed')}; the other outputs never reach it, the converter refuses them first. "
        f"Every position's top-1 token equal to transformers' (float32, same checkpoint, as a user loads it): {kinds(lambda l: top1(run(l)))}. "
        "Largest logit difference to the closer of transformers' float32 loads (deepseek2 with its sigmoid router, below): "
        + ", ".join(f"{closest(r):.3g} ({k}, {m})" for m, k, r in plain) + "."]
    for model, probe in report.get("llama_cpp_per_layer_probe", {}).items():
        said = _llama_refusal(probe) if probe.get("forward") != "done" else "loaded it"
        bullets.append(f"* Per-layer expert counts ({model}): the uniform prune's GGUF written again with `{probe.get('key')}` = "
                       f"{probe.get('value')} (the global prune's counts per MoE layer, as an array) gives llama.cpp: {said}. This llama.cpp reads "
                       "`<arch>.expert_count` as one number for every architecture (src/llama-model.cpp, `get_key`, where "
                       "`expert_used_count` and some architectures' `expert_feed_forward_length` take per-layer arrays).")
    if any("gating_overridden_to_sigmoid" in r for _, _, r in rows):
        bullets.append(
            "* The deepseek2 GGUFs carry no `expert_gating_func`: the converter writes it only from a `scoring_func` key "
            "(conversion/base.py), which the bundled checkpoint's config, written by transformers 5's DeepseekV3Config, does not have "
            "(transformers hard-codes DeepSeek-V3's sigmoid router), so llama.cpp falls back to softmax (src/models/deepseek2.cpp) and "
            "routes differently. With the key overridden to sigmoid at load, every position's top-1 equal: "
            f"{kinds(lambda l: top1(run(l).get('gating_overridden_to_sigmoid', {})))}. The original's GGUF has the same gap, so it "
            "is the transformers 5 config against the converter, not compression; a config carrying `scoring_func: sigmoid` (as "
            "DeepSeek's own do) converts with it.")
    bullets.append(
        "* On the 4-bit outputs llama.cpp matches one of transformers' two float32 loads (as a user loads it, or dequantized as the "
        "converter reads it) and not the other: those two loads differ from each other by as much, with identical weights. Checked by "
        "hand on 2026-12-07 (the GGUF's tensors equal the checkpoint's packed weights dequantised; the experts' forward is the same in "
        "both loads given the same routing): one token's expert choice flips at a near-tie (ref-mixtral layer 0, token 4: experts 3+7 "
        "vs 3+6, router weight 0.288; ref-deepseek layer 1, token 8), after attention outputs that differ by 0.006. A max abs difference of "
        "1-3 on these toy models can be one routing flip; top-1 agreement is the measure to read.")
    return bullets


def _quantised_growth(report: dict) -> str:
    """GGUF bytes over checkpoint bytes for each quantised output the patched converter converted."""
    ratios = [facts["loaders"][GGUF_TOY]["gguf_bytes"] / facts["weight_bytes"] for outputs in report["models"].values()
              for facts in outputs.values() if facts.get("config", {}).get("quantization_config") and facts["loaders"][GGUF_TOY].get("converted")]
    return ", ".join(f"{ratio:.1f}x" for ratio in ratios) or "-"


def _rope_note(report: dict) -> str:
    """Whether the old transformers read another rope_theta than ours did (the usual cause of its different logits)."""
    seen = {(facts["loaders"]["transformers"].get("rope_theta"), facts["loaders"][PLAIN_OLD].get("rope_theta"))
            for outputs in report["models"].values() for facts in outputs.values()
            if "loaders" in facts and facts["loaders"]["transformers"].get("loaded") and facts["loaders"][PLAIN_OLD].get("loaded")}
    differ = sorted((ours, old) for ours, old in seen if ours != old)
    if not differ:
        return ""
    return ("Its rope_theta differs from what transformers 5.23 reads, " + ", ".join(f"{old:g} instead of {ours:g}" for ours, old in differ) +
            ": transformers 5 saves rope_theta inside `rope_parameters`, which 4.x ignores, falling back to the architecture's default "
            "(Mixtral: 1e6). The original bundled checkpoint has the same config, so this is the transformers 5 config format, not moe-compress's doing.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="bundled model or checkpoint (repeatable; default ref-mixtral)")
    parser.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH, help="where outputs, GGUFs and the sdist go")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the converter's virtual environment (created once)")
    parser.add_argument("--build-llama-cpp", type=int, default=0, metavar="SECONDS",
                        help="compile llama.cpp's `llama` library (once per commit, under ~/.cache/moe_compress), giving up after SECONDS "
                             "(0: do not; a finished build is used either way)")
    parser.add_argument("--llama-cpp-forward", action="store_true",
                        help="only fill the llama.cpp runtime columns of the rows in results/serving.json, from the GGUFs in --scratch")
    parser.add_argument("--kind", action="append", choices=KINDS,
                        help="only this output kind (repeatable; default all): its rows replace or join those in results/serving.json")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite results/serving.md from results/serving.json and stop")
    args = parser.parse_args()
    if args.markdown_only:
        report = json.loads((RESULTS / "serving.json").read_text())
        report["vllm_summary"] = _vllm_summary(report["vllm"])
        (RESULTS / "serving.md").write_text(markdown(report))
        return
    models = args.model or ["ref-mixtral"]
    kinds = args.kind or KINDS
    sdist, commit = llama_cpp_sources(args.scratch)
    theirs = ensure_venv(args.venv, sdist)
    built = llama_cpp_runtime.build(sdist / "vendor" / "llama.cpp", LLAMA_CPP_BUILDS, commit, theirs, args.build_llama_cpp) if args.build_llama_cpp else \
        llama_cpp_runtime.build_record(LLAMA_CPP_BUILDS, commit)
    lib = llama_cpp_runtime.library(LLAMA_CPP_BUILDS, commit)
    command = ("python bench/serving.py" + "".join(f" --model {m}" for m in ([] if args.llama_cpp_forward else models)) + "".join(f' --kind "{k}"' for k in args.kind or []) +
               (f" --build-llama-cpp {args.build_llama_cpp}" if args.build_llama_cpp else "") + (" --llama-cpp-forward" if args.llama_cpp_forward else ""))
    if args.llama_cpp_forward:
        if lib is None:
            sys.exit(f"llama.cpp's library is not built ({(built or {}).get('status', 'never tried')}): add --build-llama-cpp SECONDS")
        report = json.loads((RESULTS / "serving.json").read_text())
        report["llama_cpp_build"] = built
        llama_cpp_columns(report, sys.executable, theirs, args.scratch, lib)
        per_layer_probe(report, list(report["models"]), theirs, args.scratch, lib)
        report["llama_cpp_run"] = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        (RESULTS / "serving.json").write_text(json.dumps(report, indent=1) + "\n")
        (RESULTS / "serving.md").write_text(markdown(report))
        print(markdown(report))
        return
    vllm = vllm_evidence(theirs, args.scratch)
    run = {"command": command, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    fresh = {**run, "llama_cpp_python": LLAMA_CPP_PYTHON, "llama_cpp_commit": commit, "converter_venv": CONVERTER_PINS,
             "llama_cpp_build": built, "vllm": vllm, "models": {}}
    report = fresh if not args.kind else json.loads((RESULTS / "serving.json").read_text())
    if args.kind:  # rows from this run join the recorded ones; the run is listed beside the first
        report["added"] = [*report.get("added", []), {**run, "kinds": args.kind, "models": models}]
        report |= {key: fresh[key] for key in ("vllm", "llama_cpp_commit", "llama_cpp_build")}
    for model in models:
        print(f"{model}: making the outputs", flush=True)
        outputs = make_outputs(model, args.scratch / model, kinds)
        try_loaders(outputs, sys.executable, theirs, sdist, args.scratch / model / "gguf", lib)
        merged = {**report["models"].get(model, {}), **outputs}
        report["models"][model] = {kind: merged[kind] for kind in KINDS if kind in merged}  # rows of kinds no longer made are dropped
        report["prompt_tokens"] = int(torch.load(args.scratch / model / "original.pt")["ids"].shape[1])
    if lib:
        per_layer_probe(report, models, theirs, args.scratch, lib)
    report["vllm_summary"] = _vllm_summary(report["vllm"])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / "serving.md").write_text(markdown(report))
    print(markdown(report))


def _vllm_summary(vllm: dict) -> str:
    if not vllm.get("resolved"):
        return f"not tried; its metadata could not be resolved here: `{vllm.get('error')}`"
    return (f"not tried. vllm {vllm['version']} resolves to `{vllm['wheel']}`, requiring {', '.join(vllm['torch_requirement']) or 'torch'}; "
            f"{vllm.get('torch_resolution', '')}. This machine has torch 2.13.0+cpu and no GPU; a CPU vLLM means building it from source.")


if __name__ == "__main__":
    main()
