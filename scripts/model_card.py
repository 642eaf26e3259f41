#!/usr/bin/env python3
"""Write the model card (README.md), eval_results.json and routing_heatmap.png of a reference model.

Why: the reference models are test fixtures for compression methods, so their card must show the
two properties those methods rely on - the model is better than trivial (validation perplexity per
domain against unigram baselines) and its experts are specialised (per-domain routing distribution
per MoE layer). Numbers are recomputed from the checkpoint, never copied by hand.

Evaluation protocol (documented in the card as well): the committed ``valid`` split of each domain
(``assets/data/<domain>/valid.jsonl``) is tokenized, documents joined by ``<|endoftext|>`` exactly as in
training, and cut into non-overlapping windows of 256 tokens (the tail shorter than a window is
dropped). Each window is scored on its own (no context carried over); perplexity is
``exp(mean NLL)`` over the 255 predicted tokens of every window. The unigram baselines score the
very same tokens with add-one-smoothed token frequencies of the train split (all domains pooled, and
the same domain only).

Usage: ``python scripts/model_card.py --model ref-mixtral [--threads 1]``
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "moe_compress" / "assets"
DOMAINS = ("pydoc", "dictionary", "manpages")
WINDOW = 256


def domain_tokens(path: Path, tok: AutoTokenizer) -> np.ndarray:
    """Token stream of a jsonl split, documents each followed by eot (as in training)."""
    with path.open(encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    ids: list[int] = []
    for seq in tok(texts, verbose=False)["input_ids"]:
        ids.extend(seq)
        ids.append(tok.eos_token_id)
    return np.asarray(ids, dtype=np.int64)


def windows(stream: np.ndarray, size: int = WINDOW) -> torch.Tensor:
    """Non-overlapping windows; the incomplete tail is dropped."""
    n = len(stream) // size
    return torch.from_numpy(stream[: n * size].reshape(n, size))


def moe_gates(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer index, router) for every MoE layer."""
    return [(i, layer.mlp.gate) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]


@torch.no_grad()
def evaluate(model: PreTrainedModel, wins: torch.Tensor, n_experts: int, batch: int = 16) -> tuple[float, np.ndarray]:
    """Mean NLL over predicted tokens, and (moe_layers, experts) counts of top-k selections."""
    gates = moe_gates(model)
    counts = np.zeros((len(gates), n_experts), dtype=np.int64)
    picked: list[torch.Tensor] = []
    hooks = [g.register_forward_hook(lambda m, a, out: picked.append(out[2])) for _, g in gates]
    nll_sum, n_tok = 0.0, 0
    for i in range(0, len(wins), batch):
        x = wins[i : i + batch]
        picked.clear()
        logits = model(input_ids=x, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        nll_sum += float(nll)
        n_tok += x[:, 1:].numel()
        for layer, idx in enumerate(picked):
            counts[layer] += np.bincount(idx.reshape(-1).numpy(), minlength=n_experts)
    for h in hooks:
        h.remove()
    return nll_sum / n_tok, counts


def unigram_nll(counts: np.ndarray, wins: torch.Tensor) -> float:
    """Mean NLL of the predicted tokens (positions 1..) under add-one smoothed unigram counts."""
    logp = np.log((counts + 1) / (counts.sum() + len(counts)))
    return float(-logp[wins[:, 1:].numpy()].mean())


def train_counts(tok: AutoTokenizer, corpus: Path, cache: Path) -> dict[str, np.ndarray]:
    """Token counts of each domain's train split (from the training cache if present)."""
    out = {}
    for d in DOMAINS:
        cached = sorted(cache.glob(f"{d}.train.*.npy"), key=lambda p: p.stat().st_mtime)
        stream = np.load(cached[-1]) if cached else domain_tokens(corpus / d / "train.jsonl", tok)
        out[d] = np.bincount(stream.astype(np.int64), minlength=len(tok))
    return out


def js_divergence(p: np.ndarray) -> float:
    """Jensen-Shannon divergence (bits) among the rows of p (equal weights): 0 = same routing everywhere."""
    def entropy(q: np.ndarray) -> float:
        q = q[q > 0]
        return float(-(q * np.log2(q)).sum())
    return entropy(p.mean(0)) - float(np.mean([entropy(r) for r in p]))


def heatmap(shares: np.ndarray, layers: list[int], path: Path, title: str) -> None:
    """(layers, domains, experts) shares -> one heatmap, log2(share / uniform), a band per layer."""
    n_layers, n_dom, n_exp = shares.shape
    img = np.log2(np.clip(shares * n_exp, 1e-3, None)).reshape(n_layers * n_dom, n_exp)
    fig, ax = plt.subplots(figsize=(min(10, 2 + 0.25 * n_exp), 0.9 + 0.16 * n_layers * n_dom), dpi=90)
    im = ax.imshow(img, cmap="RdBu_r", vmin=-3, vmax=3, aspect="auto", interpolation="nearest")
    for b in range(1, n_layers):
        ax.axhline(b * n_dom - 0.5, color="black", lw=1.2)
    ax.set_yticks(range(n_layers * n_dom))
    ax.set_yticklabels([f"L{layer} {d}" for layer in layers for d in DOMAINS], fontsize=6)
    ax.set_xticks(range(n_exp))
    ax.set_xticklabels(range(n_exp), fontsize=6)
    ax.set_xlabel("expert")
    ax.set_title(title, fontsize=8)
    cb = fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    cb.set_label("log2(share / uniform)", fontsize=7)
    cb.ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def architecture(model: PreTrainedModel) -> tuple[list[str], dict[str, int]]:
    """Markdown bullet lines describing the architecture, and parameter counts."""
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    embed = model.model.embed_tokens.weight.numel()
    routed = active_routed = 0
    for layer in model.model.layers:
        if hasattr(layer.mlp, "experts"):
            n = sum(p.numel() for p in layer.mlp.experts.parameters())
            routed += n
            active_routed += n * c.num_experts_per_tok // layer.mlp.experts.num_experts
    n_exp = getattr(c, "n_routed_experts", None) or c.num_local_experts
    lines = [
        f"- `model_type`: `{c.model_type}` (`{c.architectures[0]}`), {c.num_hidden_layers} layers, hidden size {c.hidden_size}, "
        f"vocabulary {c.vocab_size}, tied input/output embeddings: {c.tie_word_embeddings}",
        f"- attention: {c.num_attention_heads} heads"
        + (f", {c.num_key_value_heads} key/value heads (GQA), head dim {c.head_dim}" if c.model_type == "mixtral" else
           f", MLA with q_lora_rank {c.q_lora_rank}, kv_lora_rank {c.kv_lora_rank}, qk_nope_head_dim {c.qk_nope_head_dim}, "
           f"qk_rope_head_dim {c.qk_rope_head_dim}, v_head_dim {c.v_head_dim}"),
    ]
    if c.model_type == "mixtral":
        lines.append(f"- MoE in every layer: {n_exp} experts (SwiGLU, intermediate {c.intermediate_size}), "
                     f"softmax router, top-{c.num_experts_per_tok}, no shared expert")
    else:
        lines.append(
            f"- first {c.first_k_dense_replace} layer(s) dense (SwiGLU, intermediate {c.intermediate_size}); layers "
            f"{c.first_k_dense_replace}..{c.num_hidden_layers - 1} MoE: {n_exp} routed experts (intermediate "
            f"{c.moe_intermediate_size}), top-{c.num_experts_per_tok}, plus {c.n_shared_experts} shared experts "
            f"(one MLP of intermediate {c.moe_intermediate_size * c.n_shared_experts}); sigmoid router with "
            f"`e_score_correction_bias` (fp32, trained with the aux-loss-free rule), n_group={c.n_group}, "
            f"topk_group={c.topk_group}, norm_topk_prob={c.norm_topk_prob}, routed_scaling_factor={c.routed_scaling_factor}"
        )
    lines.append(f"- RoPE theta {c.rope_parameters['rope_theta']:g}, max_position_embeddings {c.max_position_embeddings} "
                 f"(trained on {WINDOW}-token sequences)")
    counts = {"total": total, "embedding": embed, "routed_experts": routed,
              "active_per_token": total - routed + active_routed}
    return lines, counts


def fmt_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--model", required=True, help="name under assets/models (ref-mixtral, ref-deepseek)")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=ASSETS / "data")
    ap.add_argument("--corpus", type=Path, default=ROOT / "build" / "corpus")
    ap.add_argument("--cache", type=Path, default=ROOT / "build" / "tokens")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    mdir = args.model_dir or ASSETS / "models" / args.model
    torch.set_num_threads(args.threads)

    tok = AutoTokenizer.from_pretrained(mdir)
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)
    model.eval()
    c = model.config
    n_exp = getattr(c, "n_routed_experts", None) or c.num_local_experts
    layers = [i for i, _ in moe_gates(model)]
    log = json.loads((mdir / "training_log.json").read_text())
    tcounts = train_counts(tok, args.corpus, args.cache)
    pooled = sum(tcounts.values())

    results: dict[str, dict[str, float | int]] = {}
    shares = np.zeros((len(layers), len(DOMAINS), n_exp))
    for j, d in enumerate(DOMAINS):
        wins = windows(domain_tokens(args.data / d / "valid.jsonl", tok))
        nll, counts = evaluate(model, wins, n_exp)
        shares[:, j] = counts / counts.sum(1, keepdims=True)
        results[d] = {
            "windows": len(wins), "predicted_tokens": int(wins[:, 1:].numel()), "ppl": math.exp(nll),
            "unigram_ppl_pooled": math.exp(unigram_nll(pooled, wins)),
            "unigram_ppl_domain": math.exp(unigram_nll(tcounts[d], wins)),
        }
        print(d, {k: round(v, 2) if isinstance(v, float) else v for k, v in results[d].items()}, flush=True)

    heatmap(shares, layers, mdir / "routing_heatmap.png", f"{args.model}: top-{c.num_experts_per_tok} routing share per "
            f"domain (valid split), log2 relative to uniform 1/{n_exp}")
    arch_lines, pcounts = architecture(model)
    jsd = {layer: js_divergence(shares[i]) for i, layer in enumerate(layers)}
    (mdir / "eval_results.json").write_text(json.dumps(
        {"window": WINDOW, "perplexity": results, "parameters": pcounts,
         "routing_share": {f"layer_{layer}": {d: [round(float(v), 5) for v in shares[i, j]] for j, d in enumerate(DOMAINS)}
                           for i, layer in enumerate(layers)},
         "routing_js_divergence_bits": {f"layer_{k}": round(v, 4) for k, v in jsd.items()}}, indent=1))

    ppl_rows = [[d, f"{r['windows']}", f"{r['predicted_tokens']:,}", f"**{r['ppl']:.2f}**", f"{r['unigram_ppl_pooled']:.1f}",
                 f"{r['unigram_ppl_domain']:.1f}"] for d, r in results.items()]
    route_sections = []
    for i, layer in enumerate(layers):
        rows = [[d] + [f"{100 * v:.1f}" for v in shares[i, j]] for j, d in enumerate(DOMAINS)]
        top = "; ".join(f"{d}: " + ", ".join(f"e{e}" for e in np.argsort(-shares[i, j])[:3]) for j, d in enumerate(DOMAINS))
        pooled_share = shares[i].mean(0)
        lo, hi = int(pooled_share.argmin()), int(pooled_share.argmax())
        route_sections.append(f"**Layer {layer}** (JS divergence between domains {jsd[layer]:.3f} bits; domain-averaged share "
                              f"min {100 * pooled_share[lo]:.1f} % (e{lo}), max {100 * pooled_share[hi]:.1f} % (e{hi}); "
                              f"top experts {top})\n\n"
                              + fmt_table(["domain"] + [f"e{e}" for e in range(n_exp)], rows))
    rare = [f"layer {layer} e{e} ({100 * shares[i].mean(0)[e]:.1f} %)" for i, layer in enumerate(layers)
            for e in range(n_exp) if shares[i].mean(0)[e] < 0.01]
    rare_note = (f"\n\n**Load balance caveat:** experts with a domain-averaged share below 1 %: {', '.join(rare)}. The "
                 "load-balancing loss did not fully prevent these from being starved in this short training run; "
                 "compression methods will see them as (nearly) unused." if rare else "")
    hist = log["history"]
    last = hist[-1]
    picks = hist[:: max(1, len(hist) // 8)]
    curve = ", ".join(f"{h['step']}: {h['loss']:.2f}" for h in picks + ([last] if picks[-1] is not last else []))
    bal = (f"a Switch-style loss computed per MoE layer and averaged (coefficient {log['aux_coef']}; router outputs "
           "captured by forward hooks on each `mlp.gate`, see `balance_loss` in scripts/train_reference.py)")
    if c.model_type != "mixtral":
        bal += (f", on the sigmoid scores normalised over experts, plus DeepSeek-V3's aux-loss-free bias update of "
                f"`e_score_correction_bias` (gamma {log['bias_gamma']} per step)")
    card = f"""# {args.model}

A small Mixture-of-Experts causal language model trained from scratch as a **reference fixture** for
`moe-compress` (tests, demos, benchmarks). It is tiny and undertrained: use it to check that
compression methods preserve behaviour, not for anything that needs a good language model.
Plain transformers checkpoint (bf16 safetensors{", router correction bias in fp32" if c.model_type != "mixtral" else ""}):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("src/moe_compress/assets/models/{args.model}")
model = AutoModelForCausalLM.from_pretrained("src/moe_compress/assets/models/{args.model}")
```

## Architecture

{chr(10).join(arch_lines)}
- parameters: {pcounts['total']:,} total ({pcounts['embedding']:,} in the tied embedding, {pcounts['routed_experts']:,} in routed experts), about {pcounts['active_per_token']:,} active per token
- tokenizer: byte-level BPE, 8192 tokens, `<|endoftext|>` = bos = eos = pad (`scripts/train_tokenizer.py`)

## Training

- data: train split of the three-domain corpus (`assets/data/README.md`): Python docs, GCIDE dictionary,
  Linux man pages; each domain a token stream (documents joined by `<|endoftext|>`) cut into
  non-overlapping {log['seq_len']}-token sequences, sampled domain-balanced (sequence g of the run from domain g mod 3)
- {log['steps']} steps x {log['batch_size']} sequences x {log['seq_len']} tokens = **{log['tokens_seen']:,} tokens**
  (train split sizes in tokens: {", ".join(f"{k} {v:,}" for k, v in log['train_tokens_per_domain'].items())})
- wall time **{log['wall_time_s'] / 60:.1f} min** on {log['device']} with {log['threads']} thread(s), torch {log['torch']}
- AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), peak lr {log['lr']}, {log['warmup']} warmup steps, cosine to 10 %,
  gradient clipping 1.0, fp32, seed {log['seed']}
- expert load balancing: {bal}
- training loss (step: loss): {curve}
- command: `{log['command']}`

## Validation perplexity

Committed `valid` split of each domain, documents joined by `<|endoftext|>`, non-overlapping windows of
{WINDOW} tokens (incomplete tail dropped), each window scored independently; perplexity = exp(mean NLL) over
the {WINDOW - 1} predicted tokens per window. Baselines score the same tokens with add-one-smoothed unigram
frequencies of the train split (all domains pooled / same domain only).

{fmt_table(["domain", "windows", "predicted tokens", "model ppl", "unigram ppl (pooled)", "unigram ppl (domain)"], ppl_rows)}

## Routing specialisation

Share of the top-{c.num_experts_per_tok} selections that go to each expert (in %, each row sums to 100), per
domain, on the same validation windows{"; selection includes the correction bias, as in inference" if c.model_type != "mixtral" else ""}.
Uniform would be {100 / n_exp:.1f} % per expert. The Jensen-Shannon divergence between the three domain
distributions (bits; 0 = identical routing) summarises how domain-specific a layer is.
`routing_heatmap.png` shows the same numbers as log2(share / uniform); `eval_results.json` has them unrounded.{rare_note}

![routing heatmap](routing_heatmap.png)

{(chr(10) * 2).join(route_sections)}

## Data licenses

Trained on the Python documentation (PSF License), GCIDE (GPL-2+) and the Linux man-pages (various free
licenses); see `assets/data/README.md`. Regenerate this card with `python scripts/model_card.py --model {args.model}`.
"""
    (mdir / "README.md").write_text(card, encoding="utf-8")
    print(f"wrote {mdir / 'README.md'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
