"""Tiny checkpoints on disk with a real (tiny) tokenizer, for CLI and end-to-end tests."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tiny_models import tiny_model

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Experts in a mixture of experts model specialise on different tokens.",
    "A router scores every expert and sends each token to the best few.",
    "Pruning removes experts that matter least for the calibration text.",
    "def main(): print('hello world') returns nothing at all.",
    "grep searches files for lines that match a regular expression.",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SENTENCES * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def write_calibration(path: Path, documents: int = 40) -> Path:
    lines = [json.dumps({"text": " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(3))}) for i in range(documents)]
    path.write_text("\n".join(lines) + "\n")
    return path


def save_tiny_checkpoint(directory: Path, family: str = "mixtral") -> Path:
    tokenizer = tiny_tokenizer()
    model = tiny_model(family, vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=0, eos_token_id=0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_dense_checkpoint(directory: Path) -> Path:
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def hub_cache_snapshot(checkpoint: Path, root: Path) -> Path:
    """`checkpoint` laid out as huggingface_hub caches a download: each file a blob named by its hash
    (sha256 for safetensors, the git blob sha1 for the rest, as `git hash-object` gives it) and a
    snapshot directory of links to the blobs. Returns the snapshot directory."""
    import hashlib
    import subprocess

    blobs, snapshot = root / "blobs", root / "snapshots" / ("0" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in sorted(checkpoint.iterdir()):
        if path.suffix == ".safetensors":
            name = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            name = subprocess.run(["git", "hash-object", str(path)], check=True, capture_output=True, text=True).stdout.strip()
        (blobs / name).write_bytes(path.read_bytes())
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", name))
    return snapshot
