#!/usr/bin/env python3
"""Train the small reference MoE models (``ref-mixtral``, ``ref-deepseek``) from scratch.

Why: compression methods need real, trained MoE checkpoints with routers that actually route
(experts used, and specialised per domain) - randomly initialised models make every method look the
same. These two cover the two router families that matter: Mixtral (softmax top-k, no shared
experts) and DeepSeek-V3 (sigmoid scores + correction bias, shared experts, a dense first layer, MLA).
They are built with plain transformers classes and saved with ``save_pretrained``, so anything that
loads Hugging Face checkpoints can load them.

Data: the train split of the three corpus domains (``scripts/build_corpus.py``), tokenized with
``assets/tokenizer``; each domain is one token stream (documents joined by ``<|endoftext|>``) cut
into non-overlapping ``--seq-len`` sequences. Sequence ``g`` of the run comes from domain ``g % 3``
(a seeded permutation of that domain's sequences), so every batch is domain-balanced even though the
dictionary is four times larger than the man pages.

Load balancing: a Switch-style loss ``E * sum_i f_i * P_i`` computed *per MoE layer* and averaged
(``balance_loss``) from the router outputs captured by forward hooks on each ``mlp.gate`` (f_i: share
of the layer's top-k picks, P_i: mean router probability -- softmax for ref-mixtral, sigmoid scores
normalised over experts for ref-deepseek). transformers' own Mixtral ``aux_loss`` is not used: it
pools the router logits of all layers before counting, so it cannot see per-layer starvation.
* ref-deepseek additionally uses DeepSeek-V3's aux-loss-free balancing:
  the router's ``e_score_correction_bias`` buffer follows (after each step ``b_i += gamma * sign(mean_load - load_i)``), so the saved
  checkpoint carries a non-zero bias, as real DeepSeek-V3 checkpoints do (it is kept in fp32).

Optimisation: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warmup + cosine decay to
10 %, gradient clipping at 1.0, fp32 on CPU (bf16 autocast on GPU), fixed seeds. Output: bf16
safetensors + tokenizer + ``training_log.json`` in ``--out``.

Usage: ``python scripts/train_reference.py --model ref-mixtral --steps 900 --threads 1``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("pydoc", "dictionary", "manpages")
ASSETS = ROOT / "src" / "moe_compress" / "assets"


# --------------------------------------------------------------------------- models


def mixtral_config(vocab_size: int, eot: int) -> MixtralConfig:
    """8 experts, top-2, 6 layers, hidden 192 (GQA 6 heads / 2 kv heads), tied embeddings."""
    return MixtralConfig(
        vocab_size=vocab_size, hidden_size=192, intermediate_size=384, num_hidden_layers=6,
        num_attention_heads=6, num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=1024, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True, router_aux_loss_coef=0.01, output_router_logits=False, router_jitter_noise=0.0,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
    )


def deepseek_config(vocab_size: int, eot: int) -> DeepseekV3Config:
    """32 routed experts (top-4) + 2 shared, dense layer 0, small MLA (q rank 96, kv rank 64), tied embeddings."""
    return DeepseekV3Config(
        vocab_size=vocab_size, hidden_size=192, intermediate_size=384, moe_intermediate_size=96,
        num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6, n_shared_experts=2,
        n_routed_experts=32, num_experts_per_tok=4, first_k_dense_replace=1, n_group=1, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=2.5, q_lora_rank=96, kv_lora_rank=64,
        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
    )


MODELS: dict[str, tuple[Callable[[int, int], PretrainedConfig], type[PreTrainedModel]]] = {
    "ref-mixtral": (mixtral_config, MixtralForCausalLM),
    "ref-deepseek": (deepseek_config, DeepseekV3ForCausalLM),
}


def moe_gates(model: nn.Module) -> list[nn.Module]:
    """The router module of every MoE layer (``layers[i].mlp.gate``; dense layers have none)."""
    return [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]


# --------------------------------------------------------------------------- data


def tokenize_domain(corpus: Path, domain: str, tokenizer_dir: Path, cache: Path) -> np.ndarray:
    """Token stream of a domain's train split (docs joined by eot), cached by content hash as uint16."""
    src = corpus / domain / "train.jsonl"
    tok_file = tokenizer_dir / "tokenizer.json"
    key = hashlib.sha256(tok_file.read_bytes() + str(src.stat().st_size).encode()).hexdigest()[:12]
    path = cache / f"{domain}.train.{key}.npy"
    if path.exists():
        return np.load(path)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    with src.open(encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    ids: list[int] = []
    for i in range(0, len(texts), 512):
        for seq in tok(texts[i : i + 512], verbose=False)["input_ids"]:
            ids.extend(seq)
            ids.append(tok.eos_token_id)
    arr = np.asarray(ids, dtype=np.uint16)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, arr)
    return arr


class BalancedBatches:
    """Domain-balanced batches of packed sequences; sequence g comes from domain g % n_domains."""

    def __init__(self, streams: list[np.ndarray], seq_len: int, seed: int) -> None:
        self.seqs = [s[: len(s) // seq_len * seq_len].reshape(-1, seq_len) for s in streams]
        self.rng = np.random.default_rng(seed)
        self.orders = [self.rng.permutation(len(s)) for s in self.seqs]
        self.g = 0

    def next(self, batch_size: int) -> torch.Tensor:
        rows = []
        for _ in range(batch_size):
            d, i = self.g % len(self.seqs), self.g // len(self.seqs)
            order = self.orders[d]
            if i >= len(order):  # another epoch over this domain: append a fresh permutation
                self.orders[d] = order = np.concatenate([order, self.rng.permutation(len(self.seqs[d]))])
            rows.append(self.seqs[d][order[i]])
            self.g += 1
        return torch.from_numpy(np.stack(rows).astype(np.int64))


# --------------------------------------------------------------------------- routing capture / balance


@dataclass
class RouterTap:
    """Forward hooks on the routers: keep (logits, top-k indices) of the latest forward per MoE layer."""

    gates: list[nn.Module]
    logits: list[torch.Tensor] = field(default_factory=list)
    indices: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        for g in self.gates:
            g.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, out: tuple[torch.Tensor, ...]) -> None:
        self.logits.append(out[0])
        self.indices.append(out[2])

    def clear(self) -> None:
        self.logits.clear()
        self.indices.clear()

    def loads(self) -> torch.Tensor:
        """(layers, experts) share of top-k selections in the latest forward."""
        n = self.gates[0].num_experts
        counts = [torch.bincount(ix.reshape(-1), minlength=n).float() for ix in self.indices]
        return torch.stack([c / c.sum() for c in counts])


def balance_loss(tap: RouterTap, scoring: str) -> torch.Tensor:
    """Switch-style load-balancing loss computed per MoE layer, then averaged: E * sum_i f_i * P_i.

    f_i is the share of the layer's top-k selections that went to expert i (no gradient), P_i the
    mean router probability (softmax, or sigmoid scores normalised per token). 1.0 when uniform.
    Why not transformers' own `aux_loss` for Mixtral: it concatenates the router logits of all
    layers before counting, so it balances expert *index* i pooled over layers and cannot see
    that one layer starves an expert while another overloads it (the first ref-mixtral had
    five experts under 1 % load that way).
    """
    losses = []
    for logits, idx in zip(tap.logits, tap.indices):
        n = logits.shape[-1]
        if scoring == "softmax":
            p = logits.float().softmax(-1).mean(0)
        else:
            scores = logits.float().sigmoid()
            p = (scores / scores.sum(-1, keepdim=True)).mean(0)
        f = torch.bincount(idx.reshape(-1), minlength=n).float() / idx.numel()
        losses.append(n * (f.detach() * p).sum())
    return torch.stack(losses).mean()


@torch.no_grad()
def update_correction_bias(tap: RouterTap, gamma: float) -> None:
    """DeepSeek-V3 aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded."""
    for gate, load in zip(tap.gates, tap.loads()):
        gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load).to(gate.e_score_correction_bias)


# --------------------------------------------------------------------------- training


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10 % of the peak."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def save_bf16(model: PreTrainedModel, out: Path, tokenizer_dir: Path) -> None:
    """bf16 safetensors (router correction bias stays fp32) + tokenizer files, loadable by plain transformers."""
    model = model.to(torch.bfloat16)
    for gate in moe_gates(model):
        if hasattr(gate, "e_score_correction_bias"):
            gate.e_score_correction_bias.data = gate.e_score_correction_bias.data.float()
    model.config.output_router_logits = False
    model.config.use_cache = True
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)


def verify(out: Path) -> str:
    """Reload from disk with the Auto classes and greedy-generate a few tokens."""
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    model.eval()
    prompt = "The open() system call"
    ids = tok(prompt, return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(gen[0])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model", choices=sorted(MODELS), required=True)
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch-size", type=int, default=12, help="sequences per step (multiple of 3 = balanced)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--bias-gamma", type=float, default=1e-3, help="DeepSeek correction-bias update speed")
    ap.add_argument("--aux-coef", type=float, default=0.01, help="per-layer load-balancing loss coefficient")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--time-limit", type=float, default=0, help="minutes; stop early and save (0 = none)")
    ap.add_argument("--corpus", type=Path, default=ROOT / "build" / "corpus")
    ap.add_argument("--tokenizer", type=Path, default=ASSETS / "tokenizer")
    ap.add_argument("--cache", type=Path, default=ROOT / "build" / "tokens")
    ap.add_argument("--out", type=Path, default=None, help="default: src/moe_compress/assets/models/<model>")
    args = ap.parse_args(argv)
    out = args.out or ASSETS / "models" / args.model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    make_config, model_cls = MODELS[args.model]
    config = make_config(len(tok), tok.eos_token_id)
    config.router_aux_loss_coef = args.aux_coef
    model = model_cls(config).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params / 1e6:.2f} M parameters, device {device}, threads {args.threads}", flush=True)

    streams = [tokenize_domain(args.corpus, d, args.tokenizer, args.cache) for d in DOMAINS]
    print("train tokens per domain:", dict(zip(DOMAINS, map(len, streams))), flush=True)
    batches = BalancedBatches(streams, args.seq_len, args.seed)
    tap = RouterTap(moe_gates(model))
    is_deepseek = args.model == "ref-deepseek"

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    history: list[dict[str, float]] = []
    t0 = time.time()
    t_log, tokens_log = t0, 0
    step = 0
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x = batches.next(args.batch_size).to(device)
        tap.clear()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            lm_loss = model(input_ids=x, labels=x, use_cache=False).loss
            aux = balance_loss(tap, "sigmoid" if is_deepseek else "softmax")
            loss = lm_loss + args.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        if is_deepseek and args.bias_gamma > 0:
            update_correction_bias(tap, args.bias_gamma)
        tokens_log += x.numel()
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            now = time.time()
            load = tap.loads()
            rec = {
                "step": step + 1, "loss": float(lm_loss.detach()), "aux": float(aux.detach()), "lr": opt.param_groups[0]["lr"],
                "grad_norm": grad_norm, "tok_per_s": tokens_log / (now - t_log), "elapsed_s": now - t0,
                "load_max_per_layer": [round(float(v), 2) for v in load.max(1).values * load.shape[1]],
                "experts_unused": int((load == 0).sum()),
            }
            history.append(rec)
            print(
                f"step {rec['step']:5d} loss {rec['loss']:.3f} aux {rec['aux']:.3f} lr {rec['lr']:.2e} "
                f"gnorm {grad_norm:.2f} {rec['tok_per_s']:.0f} tok/s max-load/uniform {rec['load_max_per_layer']} "
                f"unused {rec['experts_unused']} "
                f"({rec['elapsed_s'] / 60:.1f} min)",
                flush=True,
            )
            t_log, tokens_log = now, 0
            if args.time_limit and (now - t0) / 60 > args.time_limit:
                print(f"time limit reached after {step + 1} steps", flush=True)
                break
    wall = time.time() - t0
    steps_done = step + 1
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    save_bf16(model, out, args.tokenizer)
    info = {
        "model": args.model, "steps": steps_done, "planned_steps": args.steps, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "tokens_seen": steps_done * args.batch_size * args.seq_len,
        "wall_time_s": round(wall, 1), "parameters": n_params, "device": str(device), "threads": args.threads,
        "lr": args.lr, "warmup": args.warmup, "aux_coef": args.aux_coef,
        "bias_gamma": args.bias_gamma if is_deepseek else None, "seed": args.seed,
        "train_tokens_per_domain": dict(zip(DOMAINS, map(int, map(len, streams)))),
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "torch": torch.__version__, "history": history,
    }
    (out / "training_log.json").write_text(json.dumps(info, indent=1))
    print(f"saved to {out} after {steps_done} steps, {info['tokens_seen']:,} tokens, {wall / 60:.1f} min", flush=True)
    print("generation check:", repr(verify(out)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
