"""Numbers as people read them, shared by the CLI tables, the model card and the HTML report."""

from __future__ import annotations


def human_count(n: float, unit: str = "") -> str:
    """12_800_000 -> '12.8M' (3 significant digits)."""
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g}P{unit}"


def human_bytes(n: float) -> str:
    """Binary units: 20287600 -> '19.35 MiB'."""
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.4g} {suffix}"
        n /= 1024
    return f"{n:.4g} PiB"


def percent_change(after: float | None, before: float | None) -> str:
    """'+1.2%', '-20.8%', '0.0%' for no change; a change too small for one decimal gets more
    decimals instead of rounding to a signed zero ('-0.0%' says nothing and looks like a bug)."""
    if after is None or not before:
        return "-"
    change = 100 * (after / before - 1)
    if change == 0:
        return "0.0%"
    for digits in (1, 2, 3):
        text = f"{change:+.{digits}f}"
        if float(text) != 0:
            return text + "%"
    return f"{'+' if change > 0 else '-'}<0.001%"
