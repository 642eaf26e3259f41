"""Every bad input a user can give: exit code 2, one line naming the problem and the fix, no output.

One table, one assertion routine. Each case builds its bad input under `tmp_path` and returns
the command line; the output directory it names, `tmp_path / "out"`, must never appear.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from fs_faults import tmpfs
from helpers import as_format_1, token_batches
from moe_compress import compress
from moe_compress.cli import app
from tiny_checkpoints import FP8_CONFIG, edit_header, fp8_layout, hub_cache_snapshot, rewrite_tensors, save_tiny_checkpoint, write_calibration, zero_fill

runner = CliRunner()


@dataclass
class Case:
    tmp: Path
    checkpoint: Path
    calib: Path
    monkeypatch: pytest.MonkeyPatch
    stack: ExitStack
    out: Path | None = None

    def __post_init__(self) -> None:
        self.out = self.out or self.tmp / "out"

    def prune(self, *extra, model=None, calib=None) -> list:
        return ["prune", model or self.checkpoint, "--out", self.out, "--seq-len", "32", "--samples", "4",
                "--calib", calib or self.calib, "--no-cache", *extra]

    def copy(self, name: str = "model") -> Path:
        return shutil.copytree(self.checkpoint, self.tmp / name)

    def text(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def recipe(self, **fields) -> list:
        body = {"model": str(self.checkpoint), "calibration": {"source": str(self.calib), "samples": 4, "seq_len": 32},
                "evaluate": {"ppl": False}, "stages": [{"prune": {"ratio": 0.25}}], **fields}
        body = {k: v for k, v in body.items() if v is not None}
        return ["run", self.text("recipe.yaml", json.dumps(body)), "--out", self.out]


def _pickle_checkpoint(c: Case) -> list:
    directory = c.copy()
    model_file = directory / "model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(model_file)), directory / "pytorch_model.bin")
    model_file.unlink()
    return c.prune(model=directory)


def _index_outside(c: Case) -> list:
    directory = c.copy()
    (directory / "model.safetensors").rename(directory / "model-00001-of-00001.safetensors")
    from safetensors import safe_open

    with safe_open(str(directory / "model-00001-of-00001.safetensors"), "pt") as handle:
        keys = list(handle.keys())
    weight_map = {k: "model-00001-of-00001.safetensors" for k in keys}
    weight_map[keys[0]] = "../x.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(directory / "model-00001-of-00001.safetensors", c.tmp / "x.safetensors")
    return c.prune(model=directory)


def _corrupt_tokenizer(c: Case) -> list:
    directory = c.copy()
    (directory / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 12')
    return c.prune(model=directory)


def _mismatched_weights(c: Case) -> list:
    directory = c.copy()
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 24
    (directory / "config.json").write_text(json.dumps(config))
    return c.prune(model=directory)


def _corrupt_config(c: Case) -> list:
    directory = c.copy()
    (directory / "config.json").write_text('{"model_type": "mixtral", ')
    return ["inspect", directory]


def _plan_wrong_type(c: Case) -> list:
    plan = {"format": "moe-compress/plan@1", "model_type": "mixtral", "top_k": 2, "layers": [{"layer": 0, "num_experts": 8, "keep": 1.5}]}
    return c.prune("--plan-in", c.text("plan.json", json.dumps(plan)))


def _device_cuda(c: Case) -> list:
    return c.prune("--device", "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}")


def _readonly_parent(c: Case) -> list:
    c.out = c.stack.enter_context(tmpfs(c.tmp / "ro", readonly=True)) / "out"
    return c.prune()


def _disk_full(c: Case) -> list:
    """The checkpoint writer hits a full disk (a real full tmpfs is in test_stats_cache / _full_disk_out)."""
    from moe_compress.sink import save

    def full(directory, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    c.monkeypatch.setattr(save, "write_model", full)
    return c.prune()


def _full_disk_out(c: Case) -> list:
    c.out = c.stack.enter_context(tmpfs(c.tmp / "small", size="64k")) / "out"
    return c.prune()


def _planted_lock(c: Case, plant: Callable[[Path], object]) -> list:
    plant(c.tmp / ".out.lock")
    return c.prune()


def _out_is_cwd(c: Case) -> list:
    c.monkeypatch.chdir(c.tmp)
    (c.tmp / "out").mkdir(exist_ok=True)
    c.monkeypatch.chdir(c.tmp / "out")
    return ["prune", c.checkpoint, "--out", ".", "--overwrite", "--seq-len", "32"]


def _plan_with_identity(c: Case, edit: Callable[[dict], dict], *extra, command: str = "prune") -> list:
    """A REAP plan made in memory for the checkpoint (recording both fingerprint kinds), its identity edited."""
    from moe_compress import compress

    plan = compress(str(c.checkpoint), ratio=0.25, calib=[torch.randint(3, 96, (2, 16))], streaming=False, cache_dir=False).plan
    body = plan.to_dict()
    body["identity"] = edit(body["identity"])
    if "fingerprint" in body["identity"]:  # the older single fingerprint: only format 1 held it
        body = as_format_1(body)
    path = c.text("plan.json", json.dumps(body))
    if command == "analyze":
        return ["analyze", c.checkpoint, "--out", c.out, "--plan", path, "--samples", "4", "--seq-len", "32", "--calib", c.calib]
    return c.prune("--plan-in", path, *extra)


def _zeroed_fingerprints(identity: dict) -> dict:
    return {**identity, "fingerprints": {kind: "0" * len(value) for kind, value in identity["fingerprints"].items()}}


def _null_fingerprint(identity: dict) -> dict:
    """The older single-fingerprint form, with none."""
    return {**{k: v for k, v in identity.items() if k != "fingerprints"}, "fingerprint": None, "fingerprint_kind": "content"}


def _switched_kind(identity: dict) -> dict:
    """The older single-fingerprint form: the content hash, labelled as the checkpoint's."""
    return {**{k: v for k, v in identity.items() if k != "fingerprints"}, "fingerprint": identity["fingerprints"]["content"], "fingerprint_kind": "checkpoint"}


def _config_class_without_model(c: Case) -> list:
    """Its own config class (trusted), but no model class for it in auto_map or in transformers."""
    directory = c.copy("own_config_only")
    (directory / "own_config.py").write_text("from transformers import MixtralConfig\n\n\nclass OwnConfig(MixtralConfig):\n    model_type = 'mixtral'\n")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "own_config.OwnConfig"}}))
    return ["inspect", directory, "--trust-remote-code"]


def _config_says(c: Case, family: str, **changes) -> Path:
    """A tiny `family` checkpoint whose config.json has `changes` (a None value deletes the key)."""
    directory = c.copy() if family == "mixtral" else save_tiny_checkpoint(c.tmp / family, family)
    config = {**json.loads((directory / "config.json").read_text()), **changes}
    (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return directory


def _damaged_hub_snapshot(c: Case) -> list:
    """A Hub cache snapshot whose weights blob has one bit flipped since it was named by its sha256."""
    snapshot = hub_cache_snapshot(c.checkpoint, c.tmp / "models--org--tiny")
    blob = (snapshot / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    return c.prune("--verify-checksums", model=snapshot)


# issue 20 items 4 and 6: lying shard headers, FP8 inputs
_EXPERT = "model.layers.1.block_sparse_moe.experts.3.w2.weight"


def _header_lie(c: Case, *extra: str) -> list:
    directory = c.copy()
    edit_header(directory / "model.safetensors", lambda header: header[_EXPERT].update(dtype="I32"))
    return c.prune(*extra, model=directory)


def _swapped_offsets(c: Case) -> list:
    directory = c.copy()
    norm, gate = "model.layers.0.input_layernorm.weight", "model.layers.0.block_sparse_moe.gate.weight"

    def swap(header: dict) -> None:
        header[norm]["data_offsets"], header[gate]["data_offsets"] = header[gate]["data_offsets"], header[norm]["data_offsets"]

    edit_header(directory / "model.safetensors", swap)
    return c.prune(model=directory)


def _zero_filled_shard(c: Case) -> list:
    directory = c.copy()
    (directory / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(c.checkpoint).save_pretrained(directory, max_shard_size="100KB")
    zero_fill(directory / "model-00002-of-00003.safetensors")
    return c.prune("--streaming", "on", model=directory)


def _huge_novice_vector(c: Case) -> list:
    directory = c.tmp / "mone"
    compress(str(c.checkpoint), "mone", 0.5, "layer", token_batches(), out=directory, cache_dir=False)

    def poison(tensors):
        tensors["model.layers.0.block_sparse_moe.experts.novice_vectors"][0, 0] = 1e38
        return tensors

    rewrite_tensors(directory, poison)
    return ["eval", directory, "--ppl", c.calib, "--seq-len", "32", "--json", c.out]


def _fp8(c: Case, damage) -> list:
    def convert(tensors):
        tensors = fp8_layout(tensors)
        damage(tensors)
        return tensors

    return c.prune(model=rewrite_tensors(c.copy(), convert, quantization_config=FP8_CONFIG))


_FP8_EXPERT = "model.layers.1.block_sparse_moe.experts.3.w1.weight"


CASES: dict[str, tuple[Callable[[Case], list], str]] = {
    # checkpoints
    "pickle-checkpoint": (_pickle_checkpoint, r"pickle weights \(pytorch_model\.bin\).*reads safetensors only"),
    "index-entry-outside": (_index_outside, r"names shard '\.\./x\.safetensors',? outside the checkpoint directory"),
    "corrupt-tokenizer": (_corrupt_tokenizer, r"tokenizer of .* is corrupt"),
    "weights-do-not-fit-config": (_mismatched_weights, r"do not match the shapes its config\.json describes"),
    "corrupt-config": (_corrupt_config, r"config\.json is corrupt: not valid JSON"),
    # calibration text
    "jsonl-number-line": (lambda c: c.prune(calib=c.text("n.jsonl", '{"text": "ok"}\n42\n')), r"n\.jsonl:2 is a JSON int, not an object"),
    "jsonl-bare-string": (lambda c: c.prune(calib=c.text("s.jsonl", '"just a string"\n')), r"s\.jsonl:1 is a JSON str, not an object"),
    "jsonl-text-null": (lambda c: c.prune(calib=c.text("z.jsonl", '{"text": null}\n')), r"z\.jsonl:1: field 'text' is null, not a string"),
    "corrupt-parquet": (lambda c: c.prune(calib=c.text("bad.parquet", b"PAR1 garbage")), r"bad\.parquet is not a readable parquet file"),
    "samples-1e9": (lambda c: c.prune("--samples", "1e9"), r"Invalid value for '--samples'.*see `.* --help`"),
    "samples-beyond-the-text": (lambda c: c.prune("--samples", "1000000000"), r"fewer than the 1000000000 requested \(--samples\)"),
    "seq-len-beyond-positions": (lambda c: c.prune("--seq-len", "4096"), r"--seq-len 4096 is longer than the model's 128 positions"),
    # options
    "device-without-gpu": (_device_cuda, r"--device cuda.*(no usable CUDA GPU|CUDA GPU\(s\))"),
    "probe-tokens-zero": (lambda c: c.prune("--method", "cprune", "--probe-tokens", "0"), r"--probe-tokens must be a positive integer; got 0"),
    "eval-windows-zero": (lambda c: c.prune("--eval", c.calib, "--eval-windows", "0"), r"--eval-windows must be a positive integer; got 0"),
    "clusters-zero": (lambda c: c.prune("--method", "cprune", "--clusters", "0"), r"--clusters must be a positive integer; got 0"),
    "analyze-clusters-zero": (lambda c: ["analyze", c.checkpoint, "--out", c.out, "--clusters", "0", "--seq-len", "32"], r"--clusters must be a positive integer"),
    "ratio-nan": (lambda c: c.prune("--ratio", "nan"), r"--ratio must be a finite number; got nan"),
    "lr-nan": (lambda c: ["finetune", c.checkpoint, "--out", c.out, "--lr", "nan"], r"--lr must be a finite number; got nan"),
    "drop-unit-bogus": (lambda c: ["drop", c.checkpoint, "--out", c.out, "--unit", "bogus", "--drop", "1"], r"--unit must be one of moe, block"),
    "cache-dir-is-a-file": (lambda c: c.prune("--cache-dir", c.text("cachefile", "x")), r"--cache-dir .*cachefile is a file"),
    "json-in-missing-dir": (lambda c: ["eval", c.checkpoint, "--ppl", c.calib, "--seq-len", "32", "--json", c.tmp / "nowhere" / "r.json"], r"--json .*directory .*nowhere does not exist"),
    "json-is-a-directory": (lambda c: ["eval", c.checkpoint, "--ppl", c.calib, "--seq-len", "32", "--json", c.tmp], r"--json .* is a directory"),
    "plan-out-in-missing-dir": (lambda c: c.prune("--plan-out", c.tmp / "nowhere" / "plan.json"), r"--plan-out .*nowhere does not exist"),
    "plan-field-wrong-type": (_plan_wrong_type, r"field 'keep' must be a list of expert indices"),
    # outputs
    "out-is-the-working-directory": (_out_is_cwd, r"current directory or one of its parents"),
    "read-only-out-parent": (_readonly_parent, r"Read-only file system"),
    "disk-full": (_disk_full, r"No space left on device"),
    "disk-full-tmpfs": (_full_disk_out, r"No space left on device"),
    # recipes
    "recipe-without-model": (lambda c: c.recipe(model=None), r"a recipe needs 'model'"),
    "recipe-field-wrong-type": (lambda c: c.recipe(calibration={"samples": "many"}), r"recipe field 'calibration': option 'samples' must be an integer"),
    "recipe-stage-option-wrong-type": (lambda c: c.recipe(stages=[{"prune": {"ratio": "high"}}]), r"stage 1 \(prune\): option 'ratio' must be a finite number"),
    "recipe-stage-option-unknown": (lambda c: c.recipe(stages=[{"drop": {"units": "block"}}]), r"stage 1 \(drop\): unknown option 'units'"),
    # issue 20 item 1: whatever is planted at the output's lock path is refused, never written into
    "lock-path-is-a-symlink": (lambda c: _planted_lock(c, lambda lock: lock.symlink_to(c.text("p.txt", "precious"))),
                               r"\.out\.lock is a symbolic link, where moe-compress keeps the lock of .*out; it was left untouched\. Move it away"),
    "lock-path-is-a-fifo": (lambda c: _planted_lock(c, os.mkfifo), r"\.out\.lock is not a regular file, where moe-compress keeps the lock"),
    "lock-path-is-a-user-file": (lambda c: _planted_lock(c, lambda lock: lock.write_text("my notes")),
                                 r"\.out\.lock is a file moe-compress did not write, where moe-compress keeps the lock"),
    # issue 20 item 3: plans whose weights fingerprint does not match or cannot be compared
    "plan-fingerprint-zeroed": (lambda c: _plan_with_identity(c, _zeroed_fingerprints), r"other weights of this architecture \(content fingerprint 0{32}"),
    "plan-fingerprint-zeroed-streamed": (lambda c: _plan_with_identity(c, _zeroed_fingerprints, "--streaming", "on"), r"other weights of this architecture \(checkpoint fingerprint 0{16}"),
    "plan-fingerprint-zeroed-dry-run": (lambda c: _plan_with_identity(c, _zeroed_fingerprints, "--dry-run"), r"other weights of this architecture \(checkpoint fingerprint 0{16}"),
    "plan-fingerprint-null": (lambda c: _plan_with_identity(c, _null_fingerprint, "--streaming", "on"), r"this plan records no weights fingerprint, .* --ignore-plan-identity"),
    "plan-fingerprint-kind-switched": (lambda c: _plan_with_identity(c, _switched_kind, "--streaming", "on"), r"other weights of this architecture \(checkpoint fingerprint [0-9a-f]{32}, this model [0-9a-f]{16}\)"),
    "analyze-plan-without-fingerprint": (lambda c: _plan_with_identity(c, _null_fingerprint, command="analyze"), r"this plan records no weights fingerprint"),
    # issue 23: --uniform rounds a global plan to a stock checkpoint
    "uniform-without-global-budget": (lambda c: c.prune("--uniform"), r"--uniform rounds a global budget's plan .* add --budget global"),
    "uniform-mone": (lambda c: c.prune("--uniform", "--budget", "global", "--method", "mone"), r"--uniform gives a stock checkpoint, which mone cannot"),
    "uniform-plan-in": (lambda c: c.prune("--uniform", "--budget", "global", "--plan-in", c.text("p.json", "{}")), r"--uniform rounds the plan a method makes"),
    "recipe-uniform-layer-budget": (lambda c: c.recipe(stages=[{"prune": {"uniform": True}}]), r"--uniform rounds a global budget's plan"),
    # issue 22 foundations: byte sizes are read by fitting.memory.parse_bytes, shared with the CLI
    "max-activation-memory-junk": (lambda c: c.prune("--max-activation-memory", "lots"), r"cannot read --max-activation-memory 'lots' as a size: use a number with a unit"),
    "max-activation-memory-negative": (lambda c: c.prune("--max-activation-memory", "-1GB"), r"--max-activation-memory must be >= 0 bytes; got '-1GB'"),
    # issue 20 item 7: the remaining earlier cases
    "seed-beyond-torch": (lambda c: c.prune("--seed", str(10**20)), r"seed must be an integer from 0 to 2\*\*64 - 1; got 100000000000000000000"),
    "finetune-seed-beyond-torch": (lambda c: ["finetune", c.checkpoint, "--out", c.out, "--seed", str(2**64)], r"seed must be an integer from 0 to 2\*\*64 - 1"),
    "recipe-seed-beyond-torch": (lambda c: c.recipe(calibration={"source": str(c.calib), "samples": 4, "seq_len": 32, "seed": 10**20}), r"seed must be an integer from 0"),
    "analyze-out-is-a-file": (lambda c: ["analyze", c.checkpoint, "--out", c.text("afile", "x"), "--seq-len", "32", "--calib", c.calib], r"--out .*afile is a file, not a directory"),
    "condense-shared-only-without-shared-experts": (lambda c: ["condense", c.checkpoint, "--out", c.out, "--experts", "0", "--calib", c.calib, "--seq-len", "32"],
                                                    r"MoE layer 0 has none.*a layer drop; use `moe-compress drop --unit moe`"),
    "recipe-condense-shared-only-without-shared-experts": (lambda c: c.recipe(stages=[{"condense": {"experts": 0}}]), r"a layer drop; use `moe-compress drop --unit moe`"),
    "trusted-config-class-without-model": (_config_class_without_model,
                                           r"model type 'mixtral': the checkpoint's own config class OwnConfig .*Add an \"AutoModelForCausalLM\" entry to auto_map"),
    "config-without-top-k": (lambda c: ["inspect", _config_says(c, "deepseek_v2", num_experts_per_tok=None)],
                             r"the deepseek_v2 config states no top-k: its config\.json has no 'num_experts_per_tok' and DeepseekV2Config has no default; add"),
    "config-expert-count-not-the-weights": (lambda c: ["inspect", _config_says(c, "mixtral", num_local_experts=4)],
                                            r"checkpoint tensor for model\.layers\.0\.mlp\.gate\.weight has shape \(8, 32\), but the config says \(4, 32\)"),
    "verify-checksums-damaged-weights": (_damaged_hub_snapshot, r"model\.safetensors of .* does not match the sha256 its Hugging Face cache records .*it is damaged"),
    "verify-checksums-no-recorded-hashes": (lambda c: c.prune("--verify-checksums"), r"--verify-checksums: .* records no hash of model\.safetensors: only a Hugging Face cache snapshot does"),
    "recipe-is-a-directory": (lambda c: ["run", c.tmp, "--out", c.out], r"recipe .* is a directory; pass the recipe's YAML file"),
    # issue 23: 4-bit that shrinks on every family
    "quantize-a-family-transformers-cannot-load-packed": (
        lambda c: ["quantize", save_tiny_checkpoint(c.tmp / "inkling", "inkling_mm_model"), "--bits", "4", "--out", c.out],
        r"a quantised inkling_mm_model checkpoint would not load in transformers: .*mlp\.w13_dn\.weight.*; keep this model unquantised\.",
    ),


    # issue 20 items 4 and 6: lying shard headers, FP8 inputs
    "header-calls-f32-i32": (_header_lie, rf"checkpoint tensor {re.escape(_EXPERT)} is stored as I32 .* but .*down_proj is a float32 parameter"),
    "header-calls-f32-i32-streamed": (lambda c: _header_lie(c, "--streaming", "on"), rf"checkpoint tensor {re.escape(_EXPERT)} is stored as I32"),
    "offsets-swapped": (_swapped_offsets, r"corrupt .*; tensor model\.layers\.0\.input_layernorm\.weight spans 1024 bytes, but F32 \[32\] needs 128"),
    "zero-filled-shard": (_zero_filled_shard, r"checkpoint shard model-00002-of-00003\.safetensors is zero-filled"),
    "novice-vector-1e38": (_huge_novice_vector, r"weight model\.layers\.0\.mlp\.experts\.novice_vectors of .*mone holds values up to 1e\+38, far beyond any trained weight"),
    "fp8-scale-missing": (lambda c: _fp8(c, lambda t: t.pop(f"{_FP8_EXPERT}_scale_inv")), rf"FP8 weight {re.escape(_FP8_EXPERT)} has no scale"),
    "fp8-scale-mis-shaped": (lambda c: _fp8(c, lambda t: t.update({f"{_FP8_EXPERT}_scale_inv": torch.ones(2, 3)})),
                             rf"FP8 weight {re.escape(_FP8_EXPERT)} \[16, 32\] has scale .* of shape \[2, 3\], but weight_block_size"),
    "fp8-scales-all-missing": (lambda c: _fp8(c, lambda t: [t.pop(k) for k in [k for k in t if k.endswith("_scale_inv")]]),
                               r"FP8 weight .* has no scale .*_scale_inv \(nor do 83 other FP8 weights\)"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    return save_tiny_checkpoint(root / "tiny"), write_calibration(root / "calib.jsonl", documents=40)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, inputs, tmp_path, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    build, message = CASES[name]
    with ExitStack() as stack:
        case = Case(tmp_path, *inputs, monkeypatch, stack)
        result = runner.invoke(app, [str(a) for a in build(case)])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}"
        assert "Traceback" not in result.output
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert re.search(message, lines[0]) and "above" not in lines[0], lines[0]
        assert not case.out.exists() or name == "out-is-the-working-directory" and not any(case.out.iterdir())
