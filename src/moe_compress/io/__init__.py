"""Loading and saving checkpoints."""

from .load import bundled_models, load_config, load_model, resolve_model
from .save import PLAN_FILE, SUMMARY_FILE, needs_remote_code, save_compressed

__all__ = [
    "PLAN_FILE",
    "SUMMARY_FILE",
    "bundled_models",
    "load_config",
    "load_model",
    "needs_remote_code",
    "resolve_model",
    "save_compressed",
]
