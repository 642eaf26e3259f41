"""Calibration and evaluation text: reading documents and cutting token batches."""

from .batches import CalibrationSpec, batches_fingerprint, calibration_batches, token_stream, windows
from .texts import bundled_domains, load_texts

__all__ = ["CalibrationSpec", "batches_fingerprint", "bundled_domains", "calibration_batches", "load_texts", "token_stream", "windows"]
