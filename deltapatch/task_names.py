"""The one rule for task names, used wherever a name enters: ingest, submit and DeltaNetwork.add_task.

A task name is 1-64 lower-case letters, digits and ``-``, starting and ending with a letter or digit
(it becomes a folder, an MLflow model name and a Prefect artifact key); ``base`` is the reserved
route to the untouched base model.

The whole string must match: the pattern ends in ``\\Z`` and is applied with ``fullmatch``, so a
trailing newline (which ``$`` lets through) is refused too. Names read back from the registry
(``<prefix><task>``) are checked again by the same rule (deltapatch/registry/reading.py).
"""

from __future__ import annotations

import re

from deltapatch.errors import TaskNameError

BASE_TASK = "base"  # deltapatch.delta.BASE, the route to the untouched base model
RESERVED_TASK_NAMES = {BASE_TASK}
# \Z, not $: `$` also matches before a trailing newline ("shapes\n" passed with re.match).
TASK_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?\Z")


def validate_task_name(name: str) -> str:
    """Return `name` if it is a valid task name, else raise TaskNameError saying why and what to use."""
    if name in RESERVED_TASK_NAMES:
        raise TaskNameError(
            f"task name {name!r} is reserved for the base model's task; pass another name with --task"
        )
    if not TASK_NAME_RE.fullmatch(name):
        suggestion = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:58] or "my-task"
        suggestion = f"{suggestion}-task" if suggestion in RESERVED_TASK_NAMES else suggestion
        raise TaskNameError(
            f"invalid task name {name!r}: use 1-64 lower-case letters, digits and '-', starting and "
            f"ending with a letter or digit; pass e.g. --task {suggestion}"
        )
    return name


__all__ = ["BASE_TASK", "RESERVED_TASK_NAMES", "TASK_NAME_RE", "validate_task_name"]
