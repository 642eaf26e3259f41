"""How much a perplexity measured on n windows can move with the choice of windows: the numbers
behind the evaluation protocol's size (`moe_compress.evaluate.protocol`).

For a reference model and the same model with 25 % of its experts pruned by REAP, every window
of 256 tokens of each bundled test split is scored once. A perplexity on n windows is exp(mean
NLL); its relative standard error is about the standard error of that mean, sd(NLL per window)
/ sqrt(n) (windows treated as independent draws from the domain). The same for the ratio
pruned / original, whose error is that of the mean per-window difference: it is what method
comparisons rest on.

    PYTHONPATH=src HF_HUB_OFFLINE=1 python scripts/eval_protocol_noise.py ref-mixtral ref-deepseek
"""

from __future__ import annotations

import json
import math
import sys

import torch
import torch.nn.functional as F

import moe_compress as mc
from moe_compress.data.batches import read_windows
from moe_compress.data.texts import bundled_domains
from moe_compress.source.load import load_model

SEQ_LEN = 256
SIZES = (16, 24, 64, 128, 256)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean NLL of each window (its seq_len - 1 predictions), float64."""
    values = []
    for batch in windows.split(16):
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
        values.append(loss.view(batch.shape[0], -1).mean(1).double())
    return torch.cat(values)


def main(names: list[str]) -> None:
    torch.manual_seed(0)
    report = {}
    for name in names:
        original, tokenizer = load_model(name)
        pruned, _ = load_model(name)
        mc.compress(pruned, "reap", 0.25, "layer", mc.CalibrationSpec("bundled", samples=64), tokenizer=tokenizer, cache_dir=False)
        report[name] = {}
        for domain in bundled_domains():
            windows = read_windows(tokenizer, f"bundled:{domain}", SEQ_LEN)
            a, b = window_nll(original, windows), window_nll(pruned, windows)
            report[name][domain] = {
                "windows_in_test_split": len(a),
                "perplexity_all_windows": round(math.exp(float(a.mean())), 3),
                "ratio_all_windows": round(math.exp(float((b - a).mean())), 4),
                # relative standard error (%) at n windows: of the perplexity, and of the pruned/original ratio
                "perplexity_se_percent": {n: round(100 * float(a.std()) / math.sqrt(n), 2) for n in SIZES},
                "ratio_se_percent": {n: round(100 * float((b - a).std()) / math.sqrt(n), 2) for n in SIZES},
            }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:] or ["ref-mixtral", "ref-deepseek"])
