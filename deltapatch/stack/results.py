"""Where flow results go: storage every machine of the pool reaches.

A training run on another machine hands its patch back as its flow result (deltapatch.pipeline
puts the patch files in it). Prefect writes results to ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK``,
which every stack process and every ``deltapatch worker start`` sets (:func:`process_env`): by
default the LocalFileSystem block ``deltapatch-results`` on ``stack.result_storage`` (a shared mount
in production, a folder both simulated machines see in the tests); ``block:s3-bucket/NAME`` names an
S3 (or any other) storage block the user created instead. The result record stores the block's id,
not a path, so the reading side resolves it through the Prefect server.

This module imports Prefect: it is used by the served deployments' process, never by `stack status`.
"""

from __future__ import annotations

from typing import Any

from prefect.filesystems import LocalFileSystem

from deltapatch.stack.settings import RESULT_BLOCK_NAME, result_block_slug, result_folder, stack_settings


def ensure_result_storage(params: dict[str, Any]) -> str:
    """Create (or point at the configured folder) the results block on the current Prefect API; its slug."""
    slug = result_block_slug(stack_settings(params))
    folder = result_folder(params)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        LocalFileSystem(basepath=str(folder)).save(RESULT_BLOCK_NAME, overwrite=True)
    return slug
