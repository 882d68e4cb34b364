"""Errors meant for the user: each message names the file or setting at fault and the fix.

`retryable` is the one home of the rule "can a retry fix this?": the Prefect tasks retry network and
server trouble (and unknown exceptions, e.g. a crashed training that resumes from its checkpoint), but
not a bad configuration, a rejected dataset, a failed gate or a fingerprint mismatch — those fail the
same way every time.
"""

from __future__ import annotations


class DeltapatchError(Exception):
    """Base class of every error the CLI prints as one line instead of a traceback.

    `hint`: one line saying what to do (the CLI prints it last); `retryable`: whether trying the same
    thing again can succeed (see :func:`retryable`).
    """

    retryable = False
    hint: str | None = None

    def __init__(self, message: str = "", *args: object, hint: str | None = None) -> None:
        super().__init__(message, *args)
        if hint is not None:
            self.hint = hint


class FingerprintMismatch(DeltapatchError):
    """A patch was made for another base model."""


class PatchFormatError(DeltapatchError):
    """A patch folder is missing files or holds tensors that do not fit the base model."""


class DatasetError(DeltapatchError):
    """An input dataset was rejected (the input is quarantined, never deleted)."""


class TaskNameError(DatasetError):
    """A task name breaks the naming rule (deltapatch.task_names.validate_task_name)."""


class RegistryError(DeltapatchError):
    """The patch registry (MLflow) refused or could not complete an operation.

    Retryable: most of these are an unreachable server or a failed artifact upload."""

    retryable = True


class RegistryUnreachable(RegistryError):
    """The MLflow server did not answer (refused or dropped connection, timeout, HTTP 5xx): what a
    server restart looks like, so the pipeline's registry steps wait for it
    (:func:`deltapatch.faults.ride_out`) — unlike a refusal, which fails the same way again."""


class GateFailed(DeltapatchError):
    """A new patch failed the base-task non-regression gate."""


def retryable(exc: BaseException | None) -> bool:
    """Whether a retry can fix `exc`: a DeltapatchError says so itself; anything else (connection
    errors, timeouts, a crashed training) is worth another try."""
    if exc is None:
        return True
    return bool(getattr(exc, "retryable", True))
