"""Where moe-compress keeps what it may reuse between runs (statistics, the families table).

One root, `$MOE_COMPRESS_CACHE` or `~/.cache/moe_compress`; every cache below it is disposable
and checked against what it claims to describe before it is used. Importing this costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("MOE_COMPRESS_CACHE", Path.home() / ".cache" / "moe_compress"))
