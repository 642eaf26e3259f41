"""How a command reads its model and where it computes: dtype, device, streaming, threads and
the activation memory budget, checked and applied the same way by every command.

Importing this costs nothing (no torch): the command line declares its options from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import progress
from .errors import OptionError


@dataclass(frozen=True)
class LoadSettings:
    """The model-reading options every command that opens a model shares (`--dtype`, `--device`, ...)."""

    dtype: str = "auto"
    device: str = "cpu"
    trust_remote_code: bool = False
    verify_checksums: bool = False
    streaming: str = "auto"
    threads: int | None = None
    max_activation_memory: str | None = None
    offload_dir: Path | None = None

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

