"""smolvm: run untrusted code in hardware-isolated microVMs.

>>> from smolvm import SmolVM
>>> with SmolVM() as vm:
...     print(vm.run("echo hi").output)
hi
"""

from __future__ import annotations

import os as _os

from . import _native
from . import exceptions as _exceptions
from .exceptions import (
    APIVersionError,
    CommandExecutionUnavailableError,
    FileTransferError,
    HostError,
    ImageError,
    NetworkError,
    OperationTimeoutError,
    SmolVMError,
    SnapshotError,
    SnapshotNotFoundError,
    ValidationError,
    VMAlreadyExistsError,
    VMNotFoundError,
    VMStartError,
)
from .types import CommandResult, OutputChunk, SnapshotInfo, VMConfig, VMState
from .vm import CommandStream, SmolVM, delete_snapshot, get_snapshot, list_snapshots
from .facade import VM
from .build import SSH_BOOT_ARGS, ImageBuilder

__version__ = _native.version()

# The package carries the `smolvm` binary that hosts each VM's supervisor process.
_bundled = _os.path.join(_os.path.dirname(__file__), "_bin", "smolvm")
if _os.path.isfile(_bundled):
    _native.set_supervisor_binary(_bundled)

__all__ = [
    "SmolVM",
    "VM",
    "VMConfig",
    "VMState",
    "CommandResult",
    "CommandStream",
    "OutputChunk",
    "SnapshotInfo",
    "list_snapshots",
    "get_snapshot",
    "delete_snapshot",
    "ImageBuilder",
    "SSH_BOOT_ARGS",
    *_exceptions.__all__,
]
