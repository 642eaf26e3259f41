"""The streamed pipeline (one layer in memory at a time) computes and writes exactly what the in-memory one does."""

from __future__ import annotations

import errno
import filecmp
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

import moe_compress as mc
from helpers import token_batches
from moe_compress.engine.statistics import collect_statistics
from moe_compress.errors import MoECompressError
from moe_compress.evaluate.lm_perplexity import perplexity
from moe_compress.source.load import load_model, load_streamed
from moe_compress.source.open import open_model
from moe_compress.walk.activations import activation_budget
from tiny_models import FAMILIES, SUPPORTED, tiny_model

STATS = ("reap_sum", "selected", "gate_sum", "output_moments", "prob_sum")


def _saved_tiny_models(root: Path, model_types) -> Path:
    """One tiny checkpoint per model type under `root`, saved as transformers saves it."""
    for model_type in model_types:
        tiny_model(model_type).save_pretrained(root / model_type)
    return root


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return _saved_tiny_models(tmp_path_factory.mktemp("sources"), FAMILIES)


def _plan_without_fingerprint(plan: dict) -> dict:
    """A plan identifies its model by a checkpoint fingerprint when streamed, also by a content hash in memory."""
    identity = {k: v for k, v in (plan.get("identity") or {}).items() if k != "fingerprints"}
    return {**plan, "identity": identity}


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name == "moe_compress_plan.json":
            plans = [_plan_without_fingerprint(json.loads((d / name).read_text())) for d in (a, b)]
            assert plans[0] == plans[1]
        elif name != "moe_compress_summary.json":  # times and memory differ
            assert filecmp.cmp(a / name, b / name, shallow=False), f"{name} differs"


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_statistics_equal_in_memory(checkpoints, family):
    weights, _ = load_streamed(checkpoints / family)
    model, _ = load_model(checkpoints / family)
    streamed, _ = collect_statistics(weights.model, token_batches(), STATS, cache_dir=False, weights=weights)
    in_memory, _ = collect_statistics(model, token_batches(), STATS, cache_dir=False)
    assert streamed.keys() == in_memory.keys()
    assert all(torch.equal(streamed[i][n], in_memory[i][n]) for i in in_memory for n in in_memory[i])
    assert all(p.device.type == "meta" for p in weights.model.parameters()), "every layer is released after its visit"


def _checkpoint_at_8_mod_64(root: Path, model_type: str) -> Path:
    """A checkpoint whose first tensor starts 8 bytes past a 64-byte boundary of its file (header padded to get there).

    `from_pretrained` maps the file, so in memory each tensor sits where the file has it.
    """
    tiny_model(model_type).save_pretrained(root)
    shard = root / "model.safetensors"
    tensors = load_file(shard)
    for pad in range(64):
        data = save(tensors, metadata={"format": "pt", "pad": "-" * pad})
        header = struct.unpack("<Q", data[:8])[0]
        if (8 + header) % 64 == 8:
            break
    else:
        pytest.fail("no header padding puts the data at 8 mod 64")
    shard.write_bytes(data)
    return root


def _misaligned(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, t in tensors.items() if t.device.type == "cpu" and t.data_ptr() % 64]


def test_weights_are_64_byte_aligned_in_memory_and_streamed(tmp_path):
    """MKL's single-row sgemm (one token routed to an expert) rounds by the weight's address on some CPUs: on an
    AMD EPYC, granitemoe's streamed statistics were one ulp off the in-memory ones (source.alignment). Wherever the
    file and the reader put a tensor, both residencies compute with it on a 64-byte boundary."""
    source = _checkpoint_at_8_mod_64(tmp_path / "source", "granitemoe")
    model, _ = load_model(source)
    assert _misaligned(model.state_dict()) == []
    weights, _ = load_streamed(source)
    with weights.loaded(weights.model) as streamed:
        assert _misaligned(streamed.state_dict()) == []
        assert all(torch.equal(t, model.state_dict()[name]) for name, t in streamed.state_dict().items())


def test_a_model_handed_over_in_memory_is_realigned_in_place():
    """The same holds for a model passed as an object (e.g. mapped by the caller's own from_pretrained)."""
    model = tiny_model("mixtral", tie_word_embeddings=True)
    weight = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is weight
    values = weight.detach().clone()
    weight.data = torch.empty(weight.numel() + 2)[2:].view(weight.shape).copy_(values)  # 8 bytes off its block
    assert _misaligned(dict(model.named_parameters())) == ["model.embed_tokens.weight"]
    opened, _, _ = open_model(model)
    assert _misaligned(dict(opened.named_parameters())) == []
    assert opened.get_input_embeddings().weight is weight and opened.get_output_embeddings().weight is weight
    assert torch.equal(weight, values)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,budget", [("reap", "layer"), ("reap", "global"), ("mone", "global")])
def test_streamed_prune_writes_the_same_bytes(checkpoints, tmp_path, family, method, budget):
    results = {}
    for streaming in (True, False):
        out = tmp_path / str(streaming)
        results[streaming] = mc.compress(
            checkpoints / family, method, 0.5, budget, token_batches(), out=out, cache_dir=False, streaming=streaming
        )
    assert results[True].model is None and results[False].model is not None
    assert _plan_without_fingerprint(results[True].plan.to_dict()) == _plan_without_fingerprint(results[False].plan.to_dict())
    _same_files(tmp_path / "True", tmp_path / "False")


@pytest.mark.parametrize("model_type", ["gemma4_text", "gemma4"])
def test_gemma4_with_per_layer_inputs_prunes_and_streams_to_the_same_bytes(tmp_path, model_type):
    """Its stack hands each layer a per-layer input positionally, computed from the per-layer embedding
    table of the stem (issue 20 item 10): carried in memory and streamed alike, by pruning and by evaluation."""
    model = tiny_model(model_type, hidden_size_per_layer_input=8)
    text = model.config.get_text_config()
    assert text.enable_moe_block and text.hidden_size_per_layer_input == 8
    model.save_pretrained(tmp_path / "source")
    weights, _ = load_streamed(tmp_path / "source")
    windows = torch.cat(token_batches(count=2, batch=3))
    assert perplexity(weights.model, windows, 2, weights=weights) == perplexity(model, windows, 2)
    for streaming in (True, False):
        mc.compress(tmp_path / "source", "reap", 0.25, "global", token_batches(1), out=tmp_path / str(streaming), cache_dir=False,
                    streaming=streaming)
    _same_files(tmp_path / "True", tmp_path / "False")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_streamed_drop_and_slim_write_the_same_bytes(checkpoints, tmp_path, family):
    source = checkpoints / family
    runs = {
        "block": lambda out, s: mc.drop(source, unit="block", n=1, calib=token_batches(), out=out, streaming=s),
        "moe": lambda out, s: mc.drop(source, unit="moe", n=1, calib=token_batches(), out=out, streaming=s),
        "wanda": lambda out, s: mc.slim(source, "wanda", 0.5, calib=token_batches(), out=out, streaming=s),
        "sparsegpt": lambda out, s: mc.slim(source, "sparsegpt", nm="2:4", calib=token_batches(), out=out, streaming=s),
    }
    for name, run in runs.items():
        run(tmp_path / f"{name}-on", True)
        run(tmp_path / f"{name}-off", False)
        _same_files(tmp_path / f"{name}-on", tmp_path / f"{name}-off")


def test_activations_offloaded_to_files_give_the_same_statistics(checkpoints, tmp_path):
    weights, _ = load_streamed(checkpoints / "deepseek_v3")
    expected, _ = collect_statistics(weights.model, token_batches(), STATS, cache_dir=False, weights=weights)
    with activation_budget(0, tmp_path):  # every batch's activations go to a file
        offloaded, _ = collect_statistics(weights.model, token_batches(), STATS, cache_dir=False, weights=weights)
    assert all(torch.equal(expected[i][n], offloaded[i][n]) for i in expected for n in expected[i])
    assert not list(tmp_path.iterdir()), "offload files are removed after the run"


def test_a_full_offload_dir_is_a_clear_error(checkpoints, tmp_path, monkeypatch):
    import moe_compress.walk.activations as activations

    def full_disk(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(activations, "open", full_disk, raising=False)
    weights, _ = load_streamed(checkpoints / "mixtral")
    with activation_budget(0, tmp_path), pytest.raises(MoECompressError, match="offload dir .* is full"):
        collect_statistics(weights.model, token_batches(), STATS, cache_dir=False, weights=weights)


def test_streamed_perplexity_equals_in_memory(checkpoints):
    weights, _ = load_streamed(checkpoints / "qwen3_moe")
    model, _ = load_model(checkpoints / "qwen3_moe")
    windows = torch.cat(token_batches(count=2, batch=3))
    assert perplexity(weights.model, windows, 2, weights=weights) == perplexity(model, windows, 2)


def test_streamed_task_scores_equal_hflm(checkpoints):
    """lm-eval log-likelihoods from one layer-streamed pass equal HFLM's on the in-memory model."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from moe_compress.evaluate.streamed_lm import StreamedLM
    from tiny_checkpoints import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    source = checkpoints.parent / "with-tokenizer"
    tiny_model("mixtral", vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=0, eos_token_id=0).save_pretrained(source)
    tokenizer.save_pretrained(source)
    pairs = [("The quick brown fox", " jumps over"), ("A router scores", " every expert"), ("grep searches", " files for lines")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    model, _ = load_model(source)
    weights, _ = load_streamed(source)
    expected = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2).loglikelihood(requests)
    found = StreamedLM(weights.model, weights, tokenizer, batch_size=2).loglikelihood(requests)
    for (a, greedy_a), (b, greedy_b) in zip(expected, found):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b


def test_multi_token_prediction_tensors_are_carried_and_pruned(tmp_path):
    """Tensors transformers does not load (DeepSeek-V3's MTP layer) are kept, renumbered after block drops,
    and pruned with the plan where they hold experts."""
    model = tiny_model("deepseek_v3", num_layers=3)
    model.save_pretrained(tmp_path / "src")
    shard = tmp_path / "src" / "model.safetensors"
    with safe_open(str(shard), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    mtp = {k.replace("layers.2.", "layers.3."): v.clone() for k, v in tensors.items() if k.startswith("model.layers.2.")}
    mtp["model.layers.3.eh_proj.weight"] = torch.randn(32, 64)
    save_file({**tensors, **mtp}, str(shard), metadata={"format": "pt"})

    pruned = mc.compress(tmp_path / "src", "reap", 0.5, "layer", token_batches(), out=tmp_path / "pruned", cache_dir=False, streaming=True)
    keep = sorted(max(pruned.plan.layers, key=lambda lp: lp.layer).keep)
    with safe_open(str(tmp_path / "pruned" / "model.safetensors"), "pt") as handle:
        out = {k: handle.get_tensor(k) for k in handle.keys() if k.startswith("model.layers.3.")}
    assert torch.equal(out["model.layers.3.eh_proj.weight"], mtp["model.layers.3.eh_proj.weight"])
    assert torch.equal(out["model.layers.3.mlp.gate.weight"], mtp["model.layers.3.mlp.gate.weight"][keep])
    for new, old in enumerate(keep):
        assert torch.equal(out[f"model.layers.3.mlp.experts.{new}.up_proj.weight"], mtp[f"model.layers.3.mlp.experts.{old}.up_proj.weight"])
    assert not any(f"experts.{len(keep)}." in k for k in out), "pruned MTP experts are gone"

    dropped = mc.drop(tmp_path / "src", unit="block", n=1, calib=token_batches(), out=tmp_path / "dropped", streaming=True)
    assert len(dropped.plan.dropped_blocks) == 1
    with safe_open(str(tmp_path / "dropped" / "model.safetensors"), "pt") as handle:
        assert torch.equal(handle.get_tensor("model.layers.2.eh_proj.weight"), mtp["model.layers.3.eh_proj.weight"])
        assert not any(k.startswith("model.layers.3.") for k in handle.keys())
    summary = json.loads((tmp_path / "pruned" / "moe_compress_summary.json").read_text())
    assert summary["carried_tensors"] == len(mtp)


def test_missing_shard_and_wrong_shape_are_clear_errors(tmp_path):
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    next((tmp_path / "sharded").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(MoECompressError, match="missing from"):
        load_streamed(tmp_path / "sharded")

    model.save_pretrained(tmp_path / "wrong")
    config = json.loads((tmp_path / "wrong" / "config.json").read_text())
    (tmp_path / "wrong" / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(MoECompressError, match="has shape .* but the config says"):  # the routers' headers, at open
        load_streamed(tmp_path / "wrong")
    (tmp_path / "wrong" / "config.json").write_text(json.dumps({**config, "intermediate_size": 24}))
    weights, _ = load_streamed(tmp_path / "wrong")
    with pytest.raises(MoECompressError, match="has shape .* but the config says"):  # an expert's tensors, when read
        collect_statistics(weights.model, token_batches(), ("selected",), cache_dir=False, weights=weights)


_DISTRIBUTED = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import torch
    from safetensors.torch import load_file, save, save_file
    sys.path.insert(0, {tests!r})
    import moe_compress as mc
    from moe_compress import distributed
    from moe_compress.engine.statistics import collect_statistics
    from moe_compress.source.load import load_streamed
    from helpers import token_batches

    distributed.init_from_environment()
    if os.environ.get("DIE_ON_RANK") == str(distributed.rank()):
        os._exit(3)
    weights, _ = load_streamed({source!r})
    batches = token_batches(count=5)
    stats, _ = collect_statistics(weights.model, batches, {stats!r}, cache_dir=False, weights=weights)
    if distributed.is_main():
        save_file({{f"{{i}}/{{n}}": v.contiguous() for i, s in stats.items() for n, v in s.items()}}, {stats_out!r})
    mc.compress({source!r}, "cprune-cosine", 0.5, "global", batches, out={out!r}, cache_dir=False, streaming=True,
                options={{"probe_tokens": 8}})
    """
)


def _torchrun(script: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_two_processes_calibrate_like_one(checkpoints, tmp_path):
    """torchrun --nproc-per-node 2 (gloo): statistics equal to one process to 1e-12 (float64 parts folded in rank
    order instead of batch order), same plan, same bytes."""
    from safetensors.torch import load_file

    source = checkpoints / "qwen2_moe"
    stats = (*STATS, "signature_similarity@8")
    script = tmp_path / "run.py"
    script.write_text(_DISTRIBUTED.format(tests=str(Path(__file__).parent), source=str(source), stats=stats,
                                          stats_out=str(tmp_path / "stats.safetensors"), out=str(tmp_path / "two")))
    result = _torchrun(script)
    assert result.returncode == 0, result.stderr[-3000:]
    weights, _ = load_streamed(source)
    single, _ = collect_statistics(weights.model, token_batches(count=5), stats, cache_dir=False, weights=weights)
    shared = load_file(str(tmp_path / "stats.safetensors"))
    for layer, named in single.items():
        for name, value in named.items():
            torch.testing.assert_close(shared[f"{layer}/{name}"], value, rtol=1e-12, atol=1e-12)
    one = mc.compress(source, "cprune-cosine", 0.5, "global", token_batches(count=5), out=tmp_path / "one", cache_dir=False,
                      streaming=True, options={"probe_tokens": 8})
    two = json.loads((tmp_path / "two" / "moe_compress_plan.json").read_text())["layers"]
    assert [(lp["keep"], lp["clusters"]) for lp in two] == [(lp.keep, lp.clusters) for lp in one.plan.layers]
    assert filecmp.cmp(tmp_path / "one" / "model.safetensors", tmp_path / "two" / "model.safetensors", shallow=False)


def test_a_rank_that_dies_stops_the_others(checkpoints, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_DISTRIBUTED.format(tests=str(Path(__file__).parent), source=str(checkpoints / "mixtral"), stats=STATS,
                                          stats_out=str(tmp_path / "stats.safetensors"), out=str(tmp_path / "out")))
    result = _torchrun(script, {"DIE_ON_RANK": "1", "MOE_COMPRESS_DIST_TIMEOUT": "60"}, timeout=240)
    assert result.returncode != 0
    assert not (tmp_path / "out").exists()


def test_symlinked_shards_are_read_and_nan_weights_refused_while_streaming(tmp_path):
    """Hub cache snapshots link their shards to blobs elsewhere; a NaN in a streamed layer is named when it is read."""
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "blobs", max_shard_size="20KB")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for item in (tmp_path / "blobs").iterdir():
        (snapshot / item.name).symlink_to(item)
    weights, _ = load_streamed(snapshot)
    stats, _ = collect_statistics(weights.model, token_batches(), ("selected",), cache_dir=False, weights=weights)
    assert sorted(stats) == [0, 1, 2]

    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[3, 0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    weights, _ = load_streamed(tmp_path / "nan")
    with pytest.raises(MoECompressError, match=r"checkpoint tensor model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight contains 1 NaN"):
        collect_statistics(weights.model, token_batches(), ("selected",), cache_dir=False, weights=weights)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_streamed_quantize_writes_the_same_bytes(checkpoints, tmp_path, family):
    """Round-to-nearest quantises each layer as it is read: the same packed tensors as in memory (gpt_oss: its fused experts
    split and packed one weight per expert)."""
    summaries = {}
    for streaming in (True, False):
        summaries[streaming] = mc.quantize(checkpoints / family, tmp_path / str(streaming), bits=4, group_size=8, streaming=streaming).summary
    _same_files(tmp_path / "True", tmp_path / "False")
    assert summaries[True]["streamed"] and not summaries[False]["streamed"]
    assert summaries[True]["checkpoint_bytes_before"] == summaries[False]["checkpoint_bytes_before"] > summaries[True]["checkpoint_bytes"]
    with safe_open(str(next((tmp_path / "True").glob("*.safetensors"))), "pt") as stored:
        assert any(".experts.0." in key and key.endswith("weight_packed") for key in stored.keys())


@pytest.mark.parametrize("streaming", [True, False])
def test_pruning_a_mone_output_again_is_refused_before_calibration(checkpoints, tmp_path, streaming):
    first = tmp_path / "mone"
    mc.compress(checkpoints / "qwen3_moe", "mone", 0.5, "layer", token_batches(), out=first, cache_dir=False, streaming=False)
    with pytest.raises(MoECompressError, match="novice experts .* cannot be pruned or merged again"):
        mc.compress(first, "reap", 0.25, "layer", [], out=tmp_path / "again", cache_dir=False, streaming=streaming, trust_remote_code=True)
    assert not (tmp_path / "again").exists()
    quantized = mc.quantize(first, tmp_path / "q", bits=8, group_size=0, streaming=streaming, trust_remote_code=True)
    assert quantized.summary["streamed"] is streaming


@pytest.fixture(scope="module")
def every_family(tmp_path_factory):
    return _saved_tiny_models(tmp_path_factory.mktemp("every-family"), SUPPORTED)


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_every_supported_family_streams_to_the_same_bytes(every_family, tmp_path, model_type):
    """A global REAP budget (non-uniform: generated code) streamed and in memory, for every supported model type."""
    for streaming in (True, False):
        mc.compress(every_family / model_type, "reap", 0.25, "global", token_batches(1), out=tmp_path / str(streaming), cache_dir=False,
                    streaming=streaming)
    _same_files(tmp_path / "True", tmp_path / "False")


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_the_meta_skeleton_computes_the_unstored_buffers_as_a_full_load_does(tmp_path, model_type):
    """The streamed skeleton leaves what the checkpoint stores on meta and computes the rest (rotary frequencies and
    other unstored buffers), skipping transformers' random initialisation of the meta tensors: every buffer it
    computes must equal, bit for bit, the same buffer of the model loaded whole."""
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path)
    streamed, _ = load_streamed(str(tmp_path))
    loaded, _ = load_model(str(tmp_path))
    whole = dict(loaded.named_buffers())
    computed = {name: buffer for name, buffer in streamed.model.named_buffers() if buffer.device.type != "meta"}
    for name, buffer in computed.items():
        assert torch.equal(buffer, whole[name].to(buffer.dtype)), (model_type, name)
