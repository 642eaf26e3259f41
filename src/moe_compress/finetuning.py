"""Lightweight fine-tuning of condensed layers (CD-MoE's recovery step).

Only the condensed layers' shared experts and kept routed experts train; everything else --
attention, embeddings, other MoE layers, the constant expert weights -- is frozen. The loss
is next-token cross-entropy on fixed-length windows of language-model text. Runs on a GPU
when one is present (or `device` says so), else on the CPU.

Defaults are the CD-MoE authors' (`finetune/finetune.py`): AdamW at a peak learning rate of
1e-5 with torch's default weight decay (0.01), decayed linearly to zero (their warm-up ratio
never reaches the custom schedule, so there is none), batches of 8 sequences of 256 tokens,
gradients clipped at 1.0 (the Trainer's default). They train one epoch over 10 000 C4 texts
(1 250 steps); 200 steps is the CPU-sized default here. `schedule="cosine"`, lr 3e-4 and no
weight decay is moe-compress's earlier recipe (the cd-moe+finetune rows recorded in
bench/results/structural.md before issue 13 used it); the structural bench runs both.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .arch.adapter import MoEAdapter
from .arch.registry import get_adapter
from .data.batches import check_seed, check_seq_len, read_windows
from .errors import MoECompressError, param
from .evaluate.lm_perplexity import perplexity
from .finite import require_finite_numbers
from .source.load import check_device
from .sink.output_lock import releases_outputs
from .sink.save import check_output_dir, save_compressed
from .progress import track


def _is_constant_router(router: torch.nn.Module) -> bool:
    """A condensed layer's router, recognised by what it is, not by our in-memory class.

    A reloaded checkpoint builds its routers from its own copy of the runtime module (loaded by
    transformers as remote code), a different Python class with the same name and buffers.
    """
    buffers = dict(router.named_buffers(recurse=False))
    return type(router).__name__ == "ConstantRouter" and {"expert_weights", "expert_ids"} <= set(buffers)


def condensed_layers(model: PreTrainedModel, adapter: MoEAdapter | None = None) -> list[int]:
    """Decoder layers whose MoE block is condensed: by its router, or as the config's structure says."""
    adapter = adapter or get_adapter(model)
    spec = getattr(model.config, "moe_compress", None) or {}
    recorded = {int(i) for i, layer in (spec.get("layers") or {}).items() if layer.get("condensed")}
    found = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        block = adapter.moe_block(layer)
        if block is not None and (index in recorded or _is_constant_router(adapter.router(block))):
            found.append(index)
    return found


#: Learning-rate multiplier as a function of the fraction of training done.
SCHEDULES = {"linear": lambda done: 1.0 - done, "cosine": lambda done: 0.5 * (1 + math.cos(math.pi * done))}


def condensed_parameters(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    """Parameters of condensed layers' kept and shared experts."""
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    params = []
    for index in condensed_layers(model, adapter):
        block = adapter.moe_block(layers[index])
        for module in [adapter.experts(block), *adapter.shared_experts(block)]:
            params += list(module.parameters())
    return params


def _windows(tokenizer: PreTrainedTokenizerBase, source: str, split: str, seq_len: int, count: int | None = None) -> torch.Tensor:
    chunks = read_windows(tokenizer, source, seq_len, count, split)
    if len(chunks) == 0:
        raise MoECompressError(f"{source!r} ({split}) has fewer tokens than one window of {seq_len}.")
    return chunks


def training_device(device: str | None) -> str:
    """Where training runs: `device`, else a GPU when one is present, else the CPU; one that does not exist is refused."""
    return str(check_device(device or ("cuda" if torch.cuda.is_available() else "cpu")))


@releases_outputs
def finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: str = "bundled",
    steps: int = 200,
    lr: float = 1e-5,
    batch_size: int = 8,
    seq_len: int = 256,
    seed: int = 0,
    eval_data: str | None = "bundled",
    eval_windows: int = 32,
    out: str | Path | None = None,
    checkpoint_every: int = 0,
    overwrite: bool = False,
    device: str | None = None,
    weight_decay: float = 0.01,
    schedule: str = "linear",
) -> dict:
    """Train the condensed layers for `steps` steps; returns losses and before/after perplexity.

    `data` is read from its "calib" split when bundled (the train split is not shipped),
    `eval_data` from its "valid" split. Intermediate checkpoints go beside the output, to
    `<out>.checkpoints/step-<n>`, so the final atomic save of `out` never touches them.
    """
    require_finite_numbers([(f"the learning rate ({param('lr')})", lr)])
    if steps < 1 or lr <= 0 or batch_size < 1 or seq_len < 1 or eval_windows < 1 or checkpoint_every < 0:
        raise MoECompressError(
            "steps, batch size, sequence length and evaluation windows must be positive, checkpoint_every at least 0, "
            f"and the learning rate a positive number; got steps={steps}, batch_size={batch_size}, seq_len={seq_len}, "
            f"eval_windows={eval_windows}, checkpoint_every={checkpoint_every}, lr={lr}."
        )
    if schedule not in SCHEDULES:
        raise MoECompressError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}.")
    check_seed(seed)
    check_seq_len(seq_len, model.config)
    params = condensed_parameters(model)
    if not params:
        raise MoECompressError("this model has no condensed layers: nothing to fine-tune. Run `moe-compress condense` first.")
    if tokenizer is None:
        raise MoECompressError("this checkpoint has no tokenizer, so training text cannot be tokenised. Save one beside the model.")
    device = torch.device(training_device(device))
    if out is not None:
        check_output_dir(out, overwrite, [getattr(model, "name_or_path", None)])
    model.to(device)
    train = _windows(tokenizer, data, "calib", seq_len)
    held_out = _windows(tokenizer, eval_data, "valid", seq_len, eval_windows) if eval_data else None
    before = perplexity(model, held_out).perplexity if held_out is not None else None

    trainable = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: SCHEDULES[schedule](step / steps))
    generator = torch.Generator().manual_seed(seed)
    losses, start = [], time.perf_counter()
    model.train()
    for step in track(range(1, steps + 1), "fine-tuning condensed layers"):
        batch = train[torch.randint(len(train), (batch_size,), generator=generator)].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if out is not None and checkpoint_every and step % checkpoint_every == 0 and step < steps:
            save_compressed(model, Path(f"{out}.checkpoints") / f"step-{step}", tokenizer, overwrite=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    after = perplexity(model, held_out).perplexity if held_out is not None else None
    report = {
        "steps": steps,
        "trainable_parameters": sum(p.numel() for p in params),
        "first_loss": sum(losses[:10]) / len(losses[:10]),  # mean of the first 10 steps
        "last_loss": sum(losses[-10:]) / len(losses[-10:]),  # mean of the last 10 steps
        "perplexity_before": before,
        "perplexity_after": after,
        "seconds": round(time.perf_counter() - start, 2),
        "device": str(device),
    }
    if out is not None:
        save_compressed(model, out, tokenizer, summary={"finetune": report}, overwrite=overwrite)
    return report
