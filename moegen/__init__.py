"""moegen: offline MoE inference by module-based batching."""

__version__ = "0.1.0"
