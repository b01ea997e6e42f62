"""Helpers of the seeds' examples."""

from __future__ import annotations

import os
from typing import Optional, Tuple, Union

from . import _native

__all__ = ["ensure_ssh_key"]


def ensure_ssh_key(key_dir: Optional[Union[str, "os.PathLike[str]"]] = None) -> Tuple[str, str]:
    """Returns ``(private_key_path, public_key_path)`` of smolvm's SSH key pair
    (ed25519, in smolvm's data directory unless ``key_dir`` is given), making it first
    when absent."""
    return _native.ensure_ssh_key(os.fspath(key_dir) if key_dir is not None else None)
