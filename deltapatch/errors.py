"""Errors meant for the user: each message names the file or setting at fault and the fix."""

from __future__ import annotations


class DeltapatchError(Exception):
    """Base class of every error the CLI prints as one line instead of a traceback."""


class FingerprintMismatch(DeltapatchError):
    """A patch was made for another base model."""


class PatchFormatError(DeltapatchError):
    """A patch folder is missing files or holds tensors that do not fit the base model."""


class DatasetError(DeltapatchError):
    """An input dataset was rejected (the input is quarantined, never deleted)."""


class RegistryError(DeltapatchError):
    """The patch registry (MLflow) refused or could not complete an operation."""


class GateFailed(DeltapatchError):
    """A new patch failed the base-task non-regression gate."""
