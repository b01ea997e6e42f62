"""Exceptions raised by smolvm. Every one derives from :class:`SmolVMError`; bad input
raises :class:`ValidationError`, which is also a :class:`ValueError`."""

from __future__ import annotations

from typing import Any, Dict, Optional

__all__ = [
    "SmolVMError",
    "ValidationError",
    "VMNotFoundError",
    "VMAlreadyExistsError",
    "VMStartError",
    "ImageError",
    "NetworkError",
    "HostError",
    "OperationTimeoutError",
    "CommandExecutionUnavailableError",
    "FileTransferError",
    "SnapshotError",
    "SnapshotNotFoundError",
    "APIVersionError",
]


class SmolVMError(Exception):
    """Base class of every smolvm error. ``details`` holds the error's fields."""

    def __init__(self, message: str = "", details: Optional[Dict[str, Any]] = None, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: Dict[str, Any] = dict(details or {}, **fields)
        for key, value in fields.items():
            setattr(self, key, value)


class ValidationError(SmolVMError, ValueError):
    """A value is not allowed; ``field``, ``value`` and ``allowed`` say which and why.
    Nothing was created or changed."""

    field: str
    value: Any
    allowed: str

    def __init__(self, message: str = "", *, field: str = "", value: Any = None, allowed: str = "", **kw: Any) -> None:
        super().__init__(message, field=field, value=value, allowed=allowed, **kw)


class VMNotFoundError(SmolVMError):
    """No VM has this id (``vm_id``)."""

    vm_id: str


class VMAlreadyExistsError(SmolVMError):
    """A VM with this id (``vm_id``) exists already."""

    vm_id: str


class VMStartError(SmolVMError):
    """The VM could not be started; the message has the reason and the log's tail."""

    vm_id: str


class ImageError(SmolVMError):
    """An image is missing or could not be built."""


class NetworkError(SmolVMError):
    """Networking failed: nat networking unavailable on this host, the address pool full, a
    TAP device or nftables rule that could not be made, egress lists that need nat, or a
    port forward (``kind`` says which kind of forward failure: ``"busy"``, ``"not found"``,
    ``"invalid input"``, ...)."""


class HostError(SmolVMError):
    """The host lacks something (a tool, a permission, disk space) or failed."""


class OperationTimeoutError(SmolVMError):
    """An operation outlived its timeout. For commands, the process and its process group
    were killed; ``stdout``/``stderr`` hold what it printed before. ``timeout_seconds`` is
    ``None`` when the VM's supervisor gave up waiting (the message says for how long)."""

    operation: str
    timeout_seconds: Optional[float]

    def __init__(
        self, message: str = "", *, operation: str = "", timeout_seconds: Optional[float] = None, **kw: Any
    ) -> None:
        kw.setdefault("stdout", b"")
        kw.setdefault("stderr", b"")
        super().__init__(message, operation=operation, timeout_seconds=timeout_seconds, **kw)


class CommandExecutionUnavailableError(SmolVMError):
    """Commands cannot run in the VM now (``reason``): it is not running, or it went away.
    ``remediation`` says what to do when known."""

    vm_id: str
    reason: str

    def __init__(self, message: str = "", *, vm_id: str = "", reason: str = "", remediation: Optional[str] = None, **kw: Any) -> None:
        super().__init__(message, vm_id=vm_id, reason=reason, remediation=remediation, **kw)


class FileTransferError(SmolVMError):
    """A file could not be copied into or out of the guest (``path``, ``reason``)."""

    path: str
    reason: str


class SnapshotError(SmolVMError):
    """Saving, restoring or removing a saved VM state failed (e.g. a snapshot taken under
    another accelerator or before its image was rebuilt, or one still in use)."""


class SnapshotNotFoundError(SnapshotError):
    """No snapshot has this name (``name``)."""

    name: str


class APIVersionError(SmolVMError):
    """The VM's supervisor was started by a smolvm that speaks another version of the
    client/supervisor API (``supervisor_version``; ``client_version`` is this one's; 0 is a
    supervisor from before API versions). Stop the VM and start it again with this smolvm,
    or use the smolvm that started it."""

    vm_id: str
    supervisor_version: int
    client_version: int
