"""A stable identity for a base model: sha256 over its state dict (names, shapes, dtypes, bytes)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Return 'sha256:<hex>' for `state_dict`; independent of dict order and device."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        # Reinterpret as bytes: works for every dtype, including bfloat16, without numpy.
        digest.update(bytes(tensor.reshape(-1).view(torch.uint8).numpy()))
    return f"sha256:{digest.hexdigest()}"
