"""An option's description, declared with the option itself (a settings dataclass's field), so the
command line's help and Python's documentation read one text. Other options it mentions are
marked with `errors.param` and read as whoever shows the text calls them (the CLI: flags)."""

from dataclasses import field
from typing import Any


def described(default: Any, description: str) -> Any:
    """A dataclass field with `default` and its `description` (read back from `field.metadata`)."""
    return field(default=default, metadata={"description": description})
