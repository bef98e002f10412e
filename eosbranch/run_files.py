"""The names of every file of a run directory (DESIGN §4), in one place.

Layout::

    RUN/spec.yaml                     fully resolved spec
    RUN/lineage.json                  parent run, fork step, branch spec, code version
    RUN/record.json                   sha256 (and text) of spec.yaml and lineage.json (run_record.py)
    RUN/metrics.parquet               tidy tables (see tables.py), each one plain Parquet file:
    RUN/examples.parquet                pandas.read_parquet("RUN/metrics.parquet") reads it
    RUN/events.parquet
    RUN/checkpoints/manifest.json     index: each checkpoint's file, sha256, row segments; completion
    RUN/checkpoints/step_00000100.pt  full state at step 100 (torch.save, loaded weights_only=True)
    RUN/checkpoints/step_00000100.json              that checkpoint's manifest entry (a spare copy)
    RUN/checkpoints/step_00000100.metrics.parquet   table rows new since the previous checkpoint
    RUN/checkpoints/step_00000100.events.parquet    (and .examples.parquet)
    RUN/checkpoints/end.json, end_00000300.*.parquet  rows from the last checkpoint on, once complete
    RUN/.lock                         held by the process writing the run (run_lock.py)
    RUN/.record.lock                  orders record.json's writer and readers (run_record.py)
"""

from __future__ import annotations

SPEC = "spec.yaml"
LINEAGE = "lineage.json"
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
END = "end.json"
LOCK = ".lock"
RECORD = "record.json"  # sha256 (and text) of spec.yaml and lineage.json, see run_record.py
PROTECTED = (SPEC, LINEAGE)
RECORD_LOCK = ".record.lock"
TABLES = ("metrics", "events", "examples")
