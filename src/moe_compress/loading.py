"""How a command reads its model and where it computes: dtype, device, streaming, threads and
the activation memory budget, checked and applied the same way by every command.

Importing this costs nothing (no torch): the command line declares its options from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import progress
from .described import described
from .errors import OptionError, param


@dataclass(frozen=True)
class LoadSettings:
    """The model-reading options every command that opens a model shares (`--dtype`, `--device`, ...)."""

    dtype: str = described("auto", "Weights dtype in memory: auto (as saved), float32, bfloat16 or float16.")
    device: str = described("cpu", "Device for computation (cpu, cuda, cuda:1). Layers visit it one at a time while calibrating.")
    trust_remote_code: bool = described(False, (
        "Run Python code shipped inside the checkpoint (its auto_map). Off by default: only for checkpoints whose authors you "
        "trust. moe-compress's own outputs load without it."))
    verify_checksums: bool = described(False, (
        "Before loading, hash every file of the checkpoint and compare it with the sha256 (git sha1 for small files) its "
        "Hugging Face cache snapshot records: its blob's name. A damaged file is refused, naming it. Only a Hub cache snapshot "
        "records hashes: a plain directory (save_pretrained or moe-compress outputs, files copied out of the cache) or a Hub id"
        " is refused with this option. Without it, only the safetensors headers and finite weights are checked."))
    streaming: str = described("auto", (
        "auto: read the model layer by layer from its checkpoint unless 2.5 times its weights (what a whole load peaks at) fit "
        "in the free memory (RAM within the container's limit, or GPU memory with " f"{param('device')} cuda), else load it whole; on: "
        "always stream; off: always load whole. Streaming gives the same results with one layer in memory."))
    threads: int | None = described(None, (
        "CPU threads for torch (default: torch's choice). On a shared machine, fewer threads than busy cores avoids stalls."))
    max_activation_memory: str | None = described(None, (
        "Keep at most this much calibration activation memory in RAM (e.g. 4GiB, 500MB; a plain number means GiB); the rest "
        "goes to files in " f"{param('offload_dir')}. Default: no limit."))
    offload_dir: Path | None = described(None, f"Directory for activations beyond {param('max_activation_memory')} (default: the system temp dir).")

    def mode(self) -> bool | str:
        """`streaming` as `source.open.open_model` takes it: auto, True or False."""
        choices = {"auto": "auto", "on": True, "off": False}
        if self.streaming not in choices:
            raise OptionError("streaming", f"must be auto, on or off; got {self.streaming!r}.")
        return choices[self.streaming]

    def check(self, *models: str | None) -> None:
        """The device exists; with verify_checksums, every file of each model matches its Hub cache's hashes."""
        from .source.load import check_device, resolve_model
        from .source.verify import verify_checksums

        check_device(self.device)
        for model in models:
            if self.verify_checksums and model is not None:
                verify_checksums(resolve_model(model), model)

    def session(self, device: str | None = None):
        """Threads, activation budget and process group for the run; yields the device to compute on."""
        from .session import compute_session

        return compute_session(self.threads, self.max_activation_memory, self.offload_dir, device or "cpu")

    def open(self, model: str, device: str | None = None, streaming: bool | None = None):
        """`source.open.open_model` with a progress line: loading a large model whole takes minutes."""
        from .source.open import open_model

        with progress.step(f"loading {model}"):
            return open_model(model, device or self.device, self.mode() if streaming is None else streaming, self.dtype, self.trust_remote_code)

