"""Tiny checkpoints on disk with a real (tiny) tokenizer, for CLI and end-to-end tests."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
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


def edit_header(shard: Path, edit) -> None:
    """Rewrite a safetensors shard's JSON header in place through `edit(header)`, leaving the data as it is
    (how a lying header is made: safetensors itself never writes one). The edit must not lengthen the header."""
    data = bytearray(shard.read_bytes())
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length, "the edited header must fit where the old one was"
    data[8 : 8 + length] = text.ljust(length)
    shard.write_bytes(bytes(data))


def zero_fill(shard: Path) -> None:
    """Zero a shard's data section, keeping its header (a preallocated file a download never filled)."""
    data = bytearray(shard.read_bytes())
    length = struct.unpack("<Q", data[:8])[0]
    shard.write_bytes(bytes(data[: 8 + length]) + bytes(len(data) - 8 - length))


def rewrite_tensors(directory: Path, convert, **config_fields) -> Path:
    """Rewrite a one-shard checkpoint through `convert(tensors) -> tensors` and set `config_fields` in its config.json."""
    shard = directory / "model.safetensors"
    with safe_open(str(shard), "pt") as handle:
        tensors, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
    save_file(convert(tensors), str(shard), metadata=metadata)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **config_fields}))
    return directory


def fp8_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every expert and attention Linear weight as FP8 with a 128x128-block inverse scale (values not calibrated:
    the layout is what header checks look at). Use with quantization_config=FP8_CONFIG."""
    converted = {}
    for key, value in tensors.items():
        if key.endswith(".weight") and value.dim() == 2 and ("experts" in key or "self_attn" in key):
            converted[key] = value.to(torch.float8_e4m3fn)
            converted[f"{key}_scale_inv"] = torch.ones(-(-value.shape[0] // 128), -(-value.shape[1] // 128))
        else:
            converted[key] = value
    return converted


FP8_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
