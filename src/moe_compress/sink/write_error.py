"""The one-line error a failed write of an output becomes, with the fix the user can make."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from ..errors import MoECompressError, param


def write_error(path: Path, exc: Exception, action: str = "write") -> MoECompressError:
    """A one-line error for a failed write (OSError, or safetensors' wrapper of one)."""
    code = getattr(exc, "errno", None)
    if code is None and (found := re.search(r"os error (\d+)", str(exc))):
        code = int(found[1])
    reason = (exc.strerror if isinstance(exc, OSError) else None) or (os.strerror(code) if code else str(exc).splitlines()[0])
    out = param("out")
    hint = {
        errno.ENOSPC: f"free some space or choose another {out}",
        errno.EDQUOT: f"free some space or choose another {out}",
        errno.EROFS: f"the file system is read-only; choose another {out}",
        errno.EACCES: f"you lack permission there; choose another {out}",
        errno.EPERM: f"you lack permission there; choose another {out}",
    }.get(code, f"check the path and choose another {out} if needed")
    return MoECompressError(f"cannot {action} {path}: {reason}; {hint}.")
