#!/usr/bin/env python3
"""Train the byte-level BPE tokenizer shared by the reference models.

Why our own tokenizer: the reference models are tiny (vocab x hidden is a large share of their
parameters), so a small 8192-token vocabulary fitted to exactly our three domains keeps the
checkpoints small while still compressing text well. Byte-level BPE never produces unknown tokens,
which matters for man-page box drawing and dictionary accents.

Each domain's train split is capped at the size of the smallest one (whole documents, corpus order),
so the merges are not dominated by the large dictionary. Training runs single-threaded
(``RAYON_NUM_THREADS=1``) so the result is reproducible and light on a shared machine.

The result is saved as a transformers ``PreTrainedTokenizerFast`` (``<|endoftext|>`` is bos, eos,
pad and unk) so ``AutoTokenizer.from_pretrained(dir)`` loads it.

Usage: ``python scripts/train_tokenizer.py [--corpus build/corpus] [--out src/moe_compress/assets/tokenizer]``
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers starts its thread pool

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("pydoc", "dictionary", "manpages")
EOT = "<|endoftext|>"


def read_texts(path: Path) -> list[str]:
    """Texts of a corpus jsonl file, in file order."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def balanced_texts(corpus: Path, split: str = "train") -> Iterator[str]:
    """Each domain's documents up to the character count of the smallest domain (whole documents)."""
    texts = {d: read_texts(corpus / d / f"{split}.jsonl") for d in DOMAINS}
    cap = min(sum(map(len, t)) for t in texts.values())
    for domain in DOMAINS:
        used = 0
        for t in texts[domain]:
            if used >= cap:
                break
            used += len(t)
            yield t


def train(corpus: Path, vocab_size: int) -> Tokenizer:
    """GPT-2 style byte-level BPE (no prefix space) with a single special token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(balanced_texts(corpus), trainer=trainer)
    return tok


def wrap(tok: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    """transformers wrapper; ``<|endoftext|>`` serves as bos/eos/pad/unk like GPT-2."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=EOT,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--corpus", type=Path, default=ROOT / "build" / "corpus")
    ap.add_argument("--out", type=Path, default=ROOT / "src" / "moe_compress" / "assets" / "tokenizer")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--max-length", type=int, default=1024, help="model_max_length stored in the config")
    args = ap.parse_args(argv)

    fast = wrap(train(args.corpus, args.vocab_size), args.max_length)
    args.out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(args.out)

    # round trip and a rough compression figure per domain (valid split)
    loaded = AutoTokenizer.from_pretrained(args.out)
    sample = "def f(x):\n    return x ** 2  # émigré │ ─"
    assert loaded.decode(loaded(sample)["input_ids"]) == sample, "tokenizer does not round-trip"
    print(f"saved {type(loaded).__name__} vocab={len(loaded)} to {args.out}")
    for domain in DOMAINS:
        texts = read_texts(args.corpus / domain / "valid.jsonl")
        n_tok = sum(len(ids) for ids in loaded(texts, verbose=False)["input_ids"])
        print(f"  {domain:10s} valid: {sum(map(len, texts)) / n_tok:.2f} chars/token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
