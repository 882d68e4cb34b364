"""Ingest a newly arriving task dataset: validate, normalise, quarantine, version with DVC.

The input formats, the output layout and every rule are specified in docs/ingestion.md. The code
follows the seams of that specification:

- :mod:`.archives` — safe materialisation (checked folders, archive extraction without surprises);
- :mod:`deltapatch.data.images` — image decode/validate (the one image pipeline, shared with
  training, ``predict`` and ``serve``);
- :mod:`.layout` — classes and splits, duplicates, the ``<split>/<class>/<sha256>.png`` layout,
  manifest.csv and task.yaml;
- :mod:`.api` — the public API: :func:`ingest` and :func:`quarantine`;
- :mod:`.model` — constants and result types.

Everything other modules import is re-exported here (``from deltapatch.data.ingest import ingest``).
"""

from deltapatch.data.ingest.api import ingest, normalise_elsewhere, quarantine
from deltapatch.data.ingest.layout import file_sha256, read_manifest
from deltapatch.data.ingest.model import (
    MANIFEST,
    MANIFEST_COLUMNS,
    RESERVED_TASK_NAMES,
    TASK_NAME_RE,
    TASK_YAML,
    BadFile,
    DuplicateGroup,
    IngestResult,
    RejectedInput,
    Status,
)
from deltapatch.task_names import validate_task_name

__all__ = [
    "MANIFEST",
    "MANIFEST_COLUMNS",
    "RESERVED_TASK_NAMES",
    "TASK_NAME_RE",
    "TASK_YAML",
    "BadFile",
    "DuplicateGroup",
    "IngestResult",
    "RejectedInput",
    "Status",
    "file_sha256",
    "ingest",
    "normalise_elsewhere",
    "quarantine",
    "read_manifest",
    "validate_task_name",
]
