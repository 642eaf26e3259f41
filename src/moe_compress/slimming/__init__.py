"""Expert slimming: compress inside the experts (weight sparsity; quantisation in `quantize`)."""

from .sparsity import SparsitySpec, make_spec, parse_nm
from .apply import SLIM_METHODS, SlimResult, slim, sparsify

__all__ = ["SLIM_METHODS", "SlimResult", "SparsitySpec", "make_spec", "parse_nm", "slim", "sparsify"]
