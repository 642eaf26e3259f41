"""Shared test helpers: token batches, routing capture, and fresh-process loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from tiny_models import VOCAB


def token_batches(count: int = 3, batch: int = 2, seq_len: int = 16, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (batch, seq_len), generator=generator) for _ in range(count)]


def selected_experts(model, adapter, input_ids: torch.Tensor) -> dict[int, set[int]]:
    """Which experts each MoE layer's router selects on `input_ids` (original indices)."""
    chosen: dict[int, set[int]] = {}
    handles = []
    for index in adapter.moe_layer_indices(model):
        router = adapter.router(adapter.moe_block(adapter.decoder_layers(model)[index]))

        def hook(_module, _args, output, index=index):
            chosen.setdefault(index, set()).update(output[2].reshape(-1).tolist())

        handles.append(router.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids)
    for handle in handles:
        handle.remove()
    return chosen


_LOADER = textwrap.dedent(
    """
    import json, sys, importlib.abc

    class _NoMoECompress(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "moe_compress" or name.startswith("moe_compress."):
                raise ImportError("moe_compress must not be needed to load a saved checkpoint")
            return None

    sys.meta_path.insert(0, _NoMoECompress())
    import torch
    import transformers

    results = {}
    for job in json.loads(sys.argv[1]):
        auto = getattr(transformers, job.get("auto", "AutoModelForCausalLM"))
        model = auto.from_pretrained(job["path"], trust_remote_code=job["remote"]).eval()
        saved = torch.load(job["path"] + "/expected.pt")
        with torch.no_grad():
            logits = model(saved["input_ids"]).logits
        state = model.state_dict()
        results[job["path"]] = {
            "class": type(model).__name__,
            "max_abs_diff": float((logits - saved["logits"]).abs().max()),
            "equal": bool(torch.equal(logits, saved["logits"])),
            "weights_equal": state.keys() == saved["state"].keys() and all(torch.equal(state[k], saved["state"][k]) for k in state),
        }
    print("RESULTS" + json.dumps(results))
    """
)


def rounded(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Symmetric round-to-nearest per group along the input (last) dimension, written independently of the
    library; the scales are those a checkpoint stores, in the weight's dtype."""
    grouped = weight.float().unflatten(-1, (-1, group))
    scale = (grouped.abs().amax(dim=-1, keepdim=True) / ((2**bits - 1) / 2)).to(weight.dtype).float()
    scale = torch.where(scale == 0, torch.finfo(weight.dtype).eps, scale)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return (torch.clamp(torch.round(grouped / scale), low, high) * scale).flatten(-2).to(weight.dtype)


@torch.no_grad()
def round_experts(model, bits: int, group: int) -> None:
    """Round every routed expert of `model` in place, as `quantize(..., scope="experts")` stores them."""
    from moe_compress import get_adapter

    adapter = get_adapter(model)
    for index in adapter.moe_layer_indices(model):
        experts = adapter.experts(adapter.moe_block(adapter.decoder_layers(model)[index]))
        for name in ("gate_up_proj", "up_proj", "down_proj"):
            tensor = getattr(experts, name, None)
            if not isinstance(tensor, torch.Tensor):
                continue
            if getattr(experts, "is_transposed", False):  # stored [E, in, out]: groups run along the middle axis
                tensor.copy_(rounded(tensor.transpose(1, 2), bits, group).transpose(1, 2))
            else:
                tensor.copy_(rounded(tensor, bits, group))


def save_expected(directory: Path, input_ids: torch.Tensor, model) -> None:
    """Store what a reload must reproduce: the in-memory model's logits and every tensor."""
    with torch.no_grad():
        logits = model(input_ids).logits
    torch.save({"input_ids": input_ids, "logits": logits, "state": model.state_dict()}, directory / "expected.pt")


def assert_reloads_exactly(result: dict) -> None:
    """Every tensor bit-identical after the reload, and logits equal up to BLAS summation order.

    Logits are not always bit-identical: transformers memory-maps safetensors, and a small
    tensor at an unaligned file offset takes another BLAS path that sums in another order
    (measured: 2e-7 on a [1, 32] gate with identical values). The weights decide exactness.
    """
    assert result["weights_equal"], f"reloaded tensors differ: {result}"
    assert result["max_abs_diff"] <= 1e-5, f"logits differ by {result['max_abs_diff']}"


def load_in_fresh_process(jobs: list[dict]) -> dict[str, dict]:
    """Load each checkpoint in a new Python process that cannot import moe_compress.

    A job names the checkpoint `path`, whether it needs `remote` code, and optionally the
    transformers `auto` class that loads it (default AutoModelForCausalLM).
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", _LOADER, json.dumps(jobs)], capture_output=True, text=True, cwd="/", env=env, timeout=900
    )
    if result.returncode != 0:
        raise AssertionError(f"fresh-process load failed:\n{result.stderr[-4000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS"))
    return json.loads(line.removeprefix("RESULTS"))


def as_format_1(plan: dict) -> dict:
    """A plan's JSON body of pruned (keep) layers as format 1 wrote it: for edits that only
    format 1 could hold, such as the single `fingerprint` of an older identity."""
    return {**plan, "format": "moe-compress/plan@1", "layers": [{k: v for k, v in lp.items() if k != "action"} for lp in plan["layers"]]}


def tensor_bytes(directory) -> int:
    """The tensor data bytes of every shard, read from the raw safetensors headers (data_offsets),
    independently of moe-compress's reader: the file sizes less the headers."""
    import json
    import struct
    from pathlib import Path

    total = 0
    for shard in Path(directory).glob("*.safetensors"):
        with shard.open("rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        total += sum(end - start for key, entry in header.items() if key != "__metadata__" for start, end in [entry["data_offsets"]])
    return total


def calm(model):
    """Smaller weights (std 0.05): a random model whose outputs do not amplify rounding noise chaotically."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.mul_(0.25)
    return model
