"""Which of two streamed models' tensors are the same, so that one resident copy serves both.

The quality guard compares a stage's output with its input, both streamed, and holds both heads
at once (`evaluate.streamed.BatchLogits`). Most stages never touch the head and the final norm:
the output stores them as the input did, and at Qwen3's 152 k-token vocabulary a second copy of
the head is 0.58 GiB of the guard's peak. A tensor is taken as the same only when it is proven
so, never assumed: the same model class and skeleton shape and dtype on both sides, the same
checkpoint keys, and those keys' stored dtype, shape and bytes equal (`Checkpoint.same_bytes`),
so the same reading makes the same tensor. Anything else is read as usual.
"""

from __future__ import annotations

from .residency import Weights


def identical_names(weights: Weights, other: Weights, names: list[str]) -> list[str]:
    """The state `names` whose tensors `weights` would read exactly as `other` holds them now: both streamed and
    unquantised, the name resident in `other`, not in `weights`, untied on both sides, and stored alike."""
    if not (weights.streamed and other.streamed) or weights.quantization or other.quantization:
        return []
    if type(weights.model) is not type(other.model):
        return []
    mine, theirs = weights.model.state_dict(keep_vars=True), other.model.state_dict(keep_vars=True)
    tied = {*weights.aliases, *weights.aliases.values(), *other.aliases, *other.aliases.values()}

    def same(name: str) -> bool:
        if name in tied or name not in mine or name not in theirs or name not in weights.targets:
            return False
        if mine[name].device.type != "meta" or theirs[name].device.type == "meta":
            return False
        if (mine[name].shape, mine[name].dtype) != (theirs[name].shape, theirs[name].dtype):
            return False
        keys = weights.targets[name]
        return keys == other.targets.get(name) and all(weights.checkpoint.same_bytes(key, other.checkpoint) for key in keys)

    return [name for name in dict.fromkeys(names) if same(name)]
