"""Reports: per-expert analysis tables and heatmaps."""

from .analysis import expert_table, write_analysis

__all__ = ["expert_table", "write_analysis"]
