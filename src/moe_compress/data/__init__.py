"""Calibration and evaluation text: reading documents and cutting token batches."""

from .batches import CalibrationSpec, batches_fingerprint, calibration_batches, check_seq_len, held_out_windows, read_windows, token_stream, windows
from .texts import bundled_domains, iter_documents, load_texts

__all__ = [
    "CalibrationSpec",
    "batches_fingerprint",
    "bundled_domains",
    "calibration_batches",
    "check_seq_len",
    "held_out_windows",
    "iter_documents",
    "load_texts",
    "read_windows",
    "token_stream",
    "windows",
]
