"""llama.cpp's own runtime for bench/serving.py: build only its `llama` library, then run GGUFs through it.

Compiling the whole llama-cpp-python sdist (pip builds every target it vendors) was stopped unfinished
after 23 minutes on the 2-core bench machine, so this builds the one CMake target a forward needs, the
`llama` shared library (with ggml and its CPU backend), from the llama.cpp the sdist vendors, once,
into a directory keyed by that llama.cpp commit; at lowest priority and two jobs, since the machine
is shared. llama-cpp-python's own Python package (same sdist, so its ctypes bindings match that
commit) is then imported from the unpacked sdist and pointed at that library with its
`LLAMA_CPP_LIB_PATH` variable: llama-cpp-python itself is not pip installed and nothing is compiled
twice. Its one requirement the converter's venv lacks, the pure-Python diskcache, is pip installed there.

The forward is `Llama(logits_all=True).eval(ids)`: one batch of the prompt's token ids with logits
requested at every position, so every position's logits compare with transformers'. Quantising uses
the library's `llama_model_quantize`, the function llama.cpp's `llama-quantize` tool calls (that tool
needs the `common` library as well, a second build this avoids).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import textwrap
import time
from pathlib import Path

#: configure flags: Release, tuned for this CPU, a shared library, nothing but the library itself
CONFIGURE = ["-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_COMMON=OFF",
             "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
             "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF"]
JOBS = 2
#: pure-Python requirement of llama-cpp-python's package missing from the converter's venv
DISKCACHE = "diskcache==5.6.3"
#: llama.cpp quantisation type (enum llama_ftype in llama.h) of the re-quantised GGUFs: Q4_0, not a K-quant,
#: because K-quants need rows of 256 and the bundled models' are 192 or 96 wide (llama.cpp would fall back to
#: 5- and 8-bit types for most tensors and the bytes would not say what 4 bits cost)
QUANT_TYPE, QUANT_FTYPE = "Q4_0", 2
#: LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID (src/llama-hparams.h)
GATING_SIGMOID = 2

# Runs `Llama(...).eval(ids)` on a GGUF (argv[1]) with llama-cpp-python against the prebuilt library,
# compares every position's logits with each saved reference (name=path arguments, a torch file with
# "ids" and "logits"; override:key=int arguments become llama.cpp metadata overrides) and prints
# RESULT{json}. llama.cpp's log goes to a temporary file, so that when it refuses a GGUF its own error
# line is what gets recorded.
FORWARD_RUNNER = textwrap.dedent(
    """
    import json, os, sys, tempfile
    import numpy as np
    import torch
    path, pairs = sys.argv[1], [arg.split("=", 1) for arg in sys.argv[2:]]
    overrides = {key.removeprefix("override:"): int(value) for key, value in pairs if key.startswith("override:")}
    references = {key: value for key, value in pairs if not key.startswith("override:")}
    first = torch.load(next(iter(references.values())))
    ids = first["ids"][0].tolist()
    log, saved = tempfile.TemporaryFile(), os.dup(2)
    os.dup2(log.fileno(), 2)
    facts = {}
    try:
        import llama_cpp
        facts["llama_cpp_python"] = llama_cpp.__version__
        llm = llama_cpp.Llama(model_path=path, n_ctx=64, n_batch=64, logits_all=True, embedding=False, n_threads=1, verbose=True,
                              kv_overrides=overrides or None)
        llm.eval(ids)
        scores = np.array(llm.scores[: len(ids)], dtype=np.float32)
        facts["forward"] = "done"
        facts["positions"] = len(ids)
        facts["overrides"] = overrides
        for name, reference in references.items():
            expected = torch.load(reference)["logits"][0].float().numpy()
            facts[name] = {"max_abs_diff": float(np.abs(scores - expected).max()),
                           "top1_agreement": float((scores.argmax(-1) == expected.argmax(-1)).mean())}
    except Exception as exc:
        os.dup2(saved, 2)
        log.seek(0)
        said = [line for line in log.read().decode(errors="replace").splitlines() if "error" in line.lower() or "failed" in line.lower()]
        facts["forward"] = "failed"
        facts["error"] = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
        facts["llama_cpp_said"] = said[-3:]
    finally:
        os.dup2(saved, 2)
    print("RESULT" + json.dumps(facts), flush=True)
    """
)

# Quantises a GGUF (argv[1] -> argv[2], ftype argv[3]) with the library's llama_model_quantize; RESULT{json}
# with its status and the quantiser's own summary lines (sizes, tensors that needed a fallback type).
QUANTIZE_RUNNER = textwrap.dedent(
    """
    import ctypes, json, os, sys, tempfile
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = int(sys.argv[3]), 1
    log, saved = tempfile.TemporaryFile(), os.dup(2)
    os.dup2(log.fileno(), 2)
    try:
        status = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
    finally:
        os.dup2(saved, 2)
    log.seek(0)
    said = [line.split(": ", 1)[-1].strip() for line in log.read().decode(errors="replace").splitlines()
            if line.startswith("llama_model_quantize_impl") and ("size" in line or "WARNING" in line or "error" in line)]
    print("RESULT" + json.dumps({"status": int(status), "said": said}), flush=True)
    """
)


# Copies a GGUF (argv[1] -> argv[2]) with `<arch>.expert_count` made a per-layer array (argv[3], comma-separated):
# how a non-uniform plan's expert counts would have to be written, to see what llama.cpp's loader says to it.
PER_LAYER_RUNNER = textwrap.dedent(
    """
    import json, sys
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata
    reader = gguf.GGUFReader(sys.argv[1])
    arch = reader.fields["general.architecture"].contents()
    counts = [int(n) for n in sys.argv[3].split(",")]
    writer = gguf.GGUFWriter(sys.argv[2], arch=arch, endianess=reader.endianess)
    new = {f"{arch}.expert_count": MetadataDetails(gguf.GGUFValueType.ARRAY, counts, sub_type=gguf.GGUFValueType.UINT32)}
    copy_with_new_metadata(reader, writer, new, [])
    print("RESULT" + json.dumps({"key": f"{arch}.expert_count", "value": counts}), flush=True)
    """
)


def build_dir(cache: Path, commit: str) -> Path:
    """Where the library of llama.cpp `commit` is built (one per commit, reused by every run)."""
    return cache / f"llama.cpp-{commit}"


def library(cache: Path, commit: str) -> Path | None:
    """The directory holding the built libllama.so, or None when that build has not finished."""
    record = build_dir(cache, commit) / "build.json"
    if not record.is_file() or json.loads(record.read_text()).get("status") != "built":
        return None
    return build_dir(cache, commit) / "build" / "bin"


def build_record(cache: Path, commit: str) -> dict | None:
    """What the last build of `commit` recorded (command, wall time, compiler, how far it got)."""
    record = build_dir(cache, commit) / "build.json"
    return json.loads(record.read_text()) if record.is_file() else None


def _compiler() -> str:
    return subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.splitlines()[0]


def _progress(log: Path) -> str:
    """Ninja's last "[done/total]" in the build log."""
    steps = re.findall(r"\[(\d+)/(\d+)\]", log.read_text(errors="replace")) if log.is_file() else []
    return f"{steps[-1][0]}/{steps[-1][1]} build steps" if steps else "no build step"


def build(source: Path, cache: Path, commit: str, python: Path, timeout: int) -> dict:
    """Build the `llama` target of the llama.cpp at `source` (commit `commit`), giving up after `timeout` s; its record.

    A finished build is reused. The compile runs under `nice -n 19` in its own process group, so
    that a timeout stops every compiler it started and nothing else.
    """
    if library(cache, commit):
        return {**build_record(cache, commit), "cached": True}
    root = build_dir(cache, commit)
    root.mkdir(parents=True, exist_ok=True)
    configure = ["cmake", "-S", str(source), "-B", str(root / "build"), *CONFIGURE]
    compile_ = ["nice", "-n", "19", "cmake", "--build", str(root / "build"), "--target", "llama", "-j", str(JOBS)]
    record = {"commit": commit, "configure": " ".join(configure), "build": " ".join(compile_), "compiler": _compiler(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    subprocess.run(configure, check=True, capture_output=True)
    start = time.perf_counter()
    with open(root / "build.log", "w") as log:
        process = subprocess.Popen(compile_, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
            code = None
    record["seconds"] = round(time.perf_counter() - start)
    record["progress"] = _progress(root / "build.log")
    record["status"] = "built" if code == 0 else f"stopped after {timeout} s" if code is None else f"failed (exit {code})"
    if code == 0:
        _python_package(source.parent.parent, root, python)
    (root / "build.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def _python_package(sdist: Path, root: Path, python: Path) -> None:
    """llama-cpp-python's package from the sdist, importable from `root/python`, its missing requirement installed."""
    (root / "python").mkdir(exist_ok=True)
    link = root / "python" / "llama_cpp"
    if not link.exists():
        link.symlink_to(sdist / "llama_cpp")
    if subprocess.run([str(python), "-c", "import diskcache"], capture_output=True).returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", DISKCACHE], check=True)


def environment(base: dict, lib: Path) -> dict:
    """`base` with llama-cpp-python's package importable and its library taken from `lib`."""
    return {**base, "PYTHONPATH": str(lib.parent.parent / "python"), "LLAMA_CPP_LIB_PATH": str(lib)}
