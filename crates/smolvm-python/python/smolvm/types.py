"""Plain data types of the SDK: the VM configuration, states and command results."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Union
import os

from . import _native

__all__ = ["VMConfig", "VMState", "CommandResult", "OutputChunk", "SnapshotInfo"]

PathLike = Union[str, "os.PathLike[str]"]


class VMState(str, enum.Enum):
    """The state of a VM. Compares equal to its name (``VMState.RUNNING == "running"``)."""

    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


class VMConfig:
    """Everything that describes a VM before it exists. Fields left out (or ``None``) get
    the runtime's defaults; every value is checked by the runtime when the config is made,
    and a bad one raises :class:`smolvm.exceptions.ValidationError` naming the field.

    Fields: ``vm_id`` (generated when absent), ``vcpu_count`` (1-32, default 2),
    ``mem_size_mib`` (128-16384, default 512), ``image`` (default ``"default"``),
    ``kernel_path``, ``initrd_path``, ``rootfs_path``, ``boot_args``, ``disk_mode``
    (``"isolated"`` or ``"shared"``), ``disk_size_mib``, ``disk_path``,
    ``retain_disk_on_delete``, ``env_vars`` (dict), ``network`` (``"auto"``: ``"nat"`` when
    this process may create TAP devices, else ``"user"``; or ``"none"``), ``egress``
    (``"allow"`` or ``"deny"``: the default for outside addresses), ``allow_egress`` and
    ``deny_egress`` (lists of ``"CIDR"`` or ``"CIDR:PORT"``; ``nat`` only). Link-local, private
    ranges and the host itself are blocked unless an ``allow_egress`` entry opens them.
    ``snapshot`` (default True): the first start resumes the image's booted template (made
    once per image and shape) instead of booting the kernel; False always boots cold.
    """

    __slots__ = ("_fields",)

    def __init__(
        self,
        vm_id: Optional[str] = None,
        vcpu_count: Optional[int] = None,
        mem_size_mib: Optional[int] = None,
        image: Optional[str] = None,
        kernel_path: Optional[PathLike] = None,
        initrd_path: Optional[PathLike] = None,
        rootfs_path: Optional[PathLike] = None,
        boot_args: Optional[str] = None,
        disk_mode: Optional[str] = None,
        disk_size_mib: Optional[int] = None,
        disk_path: Optional[PathLike] = None,
        retain_disk_on_delete: Optional[bool] = None,
        env_vars: Optional[Mapping[str, str]] = None,
        network: Optional[str] = None,
        egress: Optional[str] = None,
        allow_egress: Optional[Sequence[str]] = None,
        deny_egress: Optional[Sequence[str]] = None,
        snapshot: Optional[bool] = None,
    ) -> None:
        given = dict(
            vm_id=vm_id,
            vcpu_count=vcpu_count,
            mem_size_mib=mem_size_mib,
            image=image,
            kernel_path=kernel_path,
            initrd_path=initrd_path,
            rootfs_path=rootfs_path,
            boot_args=boot_args,
            disk_mode=disk_mode,
            disk_size_mib=disk_size_mib,
            disk_path=disk_path,
            retain_disk_on_delete=retain_disk_on_delete,
            env_vars=dict(env_vars) if isinstance(env_vars, Mapping) else env_vars,
            network=network,
            egress=egress,
            allow_egress=list(allow_egress) if isinstance(allow_egress, (list, tuple)) else allow_egress,
            deny_egress=list(deny_egress) if isinstance(deny_egress, (list, tuple)) else deny_egress,
            snapshot=snapshot,
        )
        object.__setattr__(self, "_fields", _native.validate_config(given))

    def __getattr__(self, name: str) -> Any:
        fields = object.__getattribute__(self, "_fields")
        if name in fields:
            value = fields[name]
            return dict(value) if isinstance(value, dict) else value
        raise AttributeError(f"VMConfig has no field {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("VMConfig is immutable; use config.replace(field=value)")

    def replace(self, **changes: Any) -> "VMConfig":
        """A copy with some fields changed (validated again)."""
        fields = self.to_dict()
        fields.update(changes)
        return VMConfig(**fields)

    def to_dict(self) -> Dict[str, Any]:
        """Every field, with defaults filled in."""
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._fields.items()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VMConfig) and self._fields == other._fields

    def __repr__(self) -> str:
        shown = dict(self._fields)
        # Values of environment variables are often secrets: names only.
        shown["env_vars"] = {k: "***" for k in shown.get("env_vars") or {}}
        inner = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        return f"VMConfig({inner})"


@dataclass(frozen=True)
class CommandResult:
    """What a command did. ``exit_code`` is 128+N when signal N ended it."""

    exit_code: int
    stdout: str
    stderr: str
    #: True when the output was cut at the cap (16 MiB per stream by default).
    truncated: bool = False
    #: Wall time of the call in seconds, seen from the host.
    duration: float = 0.0
    #: The raw bytes of stdout (``stdout`` is them decoded as UTF-8, errors replaced).
    stdout_bytes: bytes = field(default=b"", repr=False)
    #: The raw bytes of stderr.
    stderr_bytes: bytes = field(default=b"", repr=False)

    @property
    def ok(self) -> bool:
        """Whether the command exited with code 0."""
        return self.exit_code == 0

    @property
    def output(self) -> str:
        """stdout without surrounding whitespace."""
        return self.stdout.strip()

    @classmethod
    def _from_native(cls, d: Dict[str, Any]) -> "CommandResult":
        out, err = d["stdout"], d["stderr"]
        return cls(
            exit_code=d["exit_code"],
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            truncated=d["truncated"],
            duration=d["duration"],
            stdout_bytes=out,
            stderr_bytes=err,
        )


@dataclass(frozen=True)
class OutputChunk:
    """A piece of a command's output as it arrived: ``stream`` is ``"stdout"`` or
    ``"stderr"``, ``data`` the raw bytes."""

    stream: str
    data: bytes

    @property
    def text(self) -> str:
        """The bytes decoded as UTF-8 (errors replaced; a character split between two
        chunks shows as replacement characters: join ``data`` to be exact)."""
        return self.data.decode("utf-8", "replace")


@dataclass(frozen=True)
class SnapshotInfo:
    """A saved VM state: memory, devices and disk at one instant. ``kind`` is
    ``"snapshot"`` (saved by name) or ``"fork"`` (kept while VMs forked from it exist)."""

    name: str
    kind: str
    #: The image the saved VM booted from.
    image: str
    #: The shape every VM made from it keeps.
    vcpu_count: int
    mem_size_mib: int
    #: The VM it was taken from.
    source_vm: Optional[str]
    #: When it was saved, Unix seconds.
    created_at: int
    #: Bytes on disk (memory stream and disk).
    size_bytes: int
    #: Its directory (private to its owner; files read-only).
    path: str
    #: The accelerator it was saved under (it loads only under the same one).
    accelerator: str = ""

    @classmethod
    def _from_native(cls, d: Dict[str, Any]) -> "SnapshotInfo":
        return cls(
            name=d["name"],
            kind=d["kind"],
            image=d["image"],
            vcpu_count=d["vcpu_count"],
            mem_size_mib=d["mem_size_mib"],
            source_vm=d["source_vm"],
            created_at=d["created_at"],
            size_bytes=d["size_bytes"],
            path=d["path"],
            accelerator=d.get("accelerator", ""),
        )
