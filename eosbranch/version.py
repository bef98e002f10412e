"""The code version, recorded in every run's lineage.json (below every module that records it)."""

__version__ = "0.1.0"
