"""User-facing errors.

Everything that a user can cause (a bad path, a model we do not support, an impossible ratio)
raises `MoECompressError` with a message that names the problem and the fix. The CLI prints
these without a traceback; anything else is a bug and keeps its traceback.
"""


class MoECompressError(Exception):
    """An error caused by the user's input, with a message that says how to fix it."""
