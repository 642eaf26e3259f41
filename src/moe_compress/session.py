"""What one compression run sets around itself and restores after: torch's CPU threads, the
calibration activation memory budget, and under torchrun the process group.

Restored on exit because the commands also run inside other processes (tests, notebooks).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OptionError, param


class TorchThreads:
    """torch's CPU thread count for the block (None: leave torch's choice), restored after."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads

    def __enter__(self) -> None:
        import torch

        self.before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)

    def __exit__(self, *exc: object) -> None:
        import torch

        torch.set_num_threads(self.before)


def byte_size(text: str | None, option: str) -> int | None:
    """'4GiB', '500MB', '2.5' (GiB) -> bytes (see `fit.memory.parse_bytes`); None stays None."""
    from .fitting.memory import parse_bytes

    return None if text is None else parse_bytes(text, option, allow_zero=True)


@contextmanager
def compute_session(
    threads: int | None = None, max_activation_memory: str | None = None, offload_dir: Path | None = None, device: str = "cpu"
) -> Iterator[str]:
    """Threads, activation budget (text such as '4GiB'; beyond it activations go to `offload_dir`) and process group.

    Yields the device to compute on: under torchrun with a cuda device, this rank's GPU.
    """
    from .distributed import init_from_environment
    from .walk.activations import activation_budget

    if threads is not None and threads < 1:
        raise OptionError("threads", f"must be a positive integer; got {threads}.")
    with TorchThreads(threads), activation_budget(byte_size(max_activation_memory, param("max_activation_memory")), offload_dir):
        yield init_from_environment(device)
