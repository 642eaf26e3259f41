"""Rewrite one small file of an output that may already be published (its card, summary, provenance).

Written beside it and renamed over it, so a reader never sees half a file; and given the mode of
the file it replaces, since the output was made readable by everyone when it was published
(`sink.publish.make_readable`) and a restrictive umask must not take that back.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def rewrite_text(path: Path, text: str) -> None:
    partial = path.parent / f".{path.name}.{os.getpid()}.partial"
    partial.write_text(text, encoding="utf-8")
    if path.exists():
        shutil.copymode(path, partial)
    partial.replace(path)
