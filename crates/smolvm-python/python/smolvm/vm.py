"""The core SDK class, :class:`SmolVM`: one microVM, from creation to deletion."""

from __future__ import annotations

import codecs
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

from . import _native
from .types import CommandResult, OutputChunk, SnapshotInfo, VMConfig, VMState

__all__ = [
    "SmolVM",
    "CommandStream",
    "DEFAULT_MAX_FILE_BYTES",
    "list_snapshots",
    "get_snapshot",
    "delete_snapshot",
]

#: Largest file :meth:`SmolVM.read_file` and :meth:`SmolVM.download` accept by default.
DEFAULT_MAX_FILE_BYTES = 4 << 30

Command = Union[str, Sequence[str]]
OutputCallback = Callable[[str], Any]


def _text_callback(cb: Optional[OutputCallback]) -> Optional[Callable[[bytes], Any]]:
    """Wraps a callback taking text so that it gets whole UTF-8 characters."""
    if cb is None:
        return None
    decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def call(data: bytes) -> None:
        text = decoder.decode(data)
        if text:
            cb(text)

    return call


def _stdin_bytes(stdin: Union[None, str, bytes]) -> Optional[bytes]:
    if stdin is None or isinstance(stdin, bytes):
        return stdin
    if isinstance(stdin, (bytearray, memoryview)):
        return bytes(stdin)
    if isinstance(stdin, str):
        return stdin.encode("utf-8")
    raise TypeError(f"stdin must be str or bytes, not {type(stdin).__name__}")


class CommandStream:
    """A running command whose output is read as it comes. Iterate over it for
    :class:`OutputChunk` objects; afterwards :attr:`result` holds the exit status. Leaving a
    ``with`` block (or calling :meth:`cancel`) before the end kills the command."""

    def __init__(self, native: Any) -> None:
        self._native = native
        self.result: Optional[CommandResult] = None

    def __iter__(self) -> Iterator[OutputChunk]:
        return self

    def __next__(self) -> OutputChunk:
        item = next(self._native, None)
        if item is None:
            self._finish()
            raise StopIteration
        return OutputChunk(stream=item[0], data=item[1])

    def _finish(self) -> None:
        d = self._native.result()
        if d is not None:
            self.result = CommandResult._from_native(d)

    def cancel(self) -> None:
        """Kills the command (with its process group) in the guest."""
        self._native.cancel()

    def __enter__(self) -> "CommandStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.result is None and self._native.result() is None:
            self.cancel()
        self._finish()


class SmolVM:
    """A microVM with its own kernel, disk, CPUs and memory.

    ``SmolVM()`` records a new VM from the default image; ``SmolVM(config)`` or
    ``SmolVM(mem_size_mib=2048)`` from a :class:`VMConfig` or its fields. Used as a context
    manager it is started on entry and, unless it was reconnected with :meth:`from_id`,
    stopped and deleted on exit.

    Lifetime: a VM whose id smolvm generated belongs to this Python process and is deleted
    if the process ends without :meth:`delete` or :meth:`close`; one with an id you chose
    (``vm_id``) lives until deleted. :meth:`close` lets go of a VM and leaves it running.
    """

    def __init__(
        self,
        config: Optional[VMConfig] = None,
        *,
        ssh_key_path: Optional[Union[str, "os.PathLike[str]"]] = None,
        **config_fields: Any,
    ) -> None:
        if config is None:
            config = VMConfig(**config_fields)
        elif config_fields:
            config = config.replace(**config_fields)
        elif not isinstance(config, VMConfig):
            raise TypeError(f"config must be a VMConfig, not {type(config).__name__}")
        owned = config.vm_id is None
        self._native = _native.Vm.create(config.to_dict(), owned)
        self._owner = True
        self._ssh_key_path = os.fspath(ssh_key_path) if ssh_key_path is not None else None
        self.last_start_timings: Optional[Dict[str, Any]] = None

    @classmethod
    def _wrap(cls, native: Any, owner: bool, ssh_key_path: Optional[str] = None) -> "SmolVM":
        vm = cls.__new__(cls)
        vm._native = native
        vm._owner = owner
        vm._ssh_key_path = ssh_key_path
        vm.last_start_timings = None
        return vm

    @classmethod
    def from_id(cls, vm_id: str, *, ssh_key_path: Optional[str] = None) -> "SmolVM":
        """Reconnects to an existing VM (from this or any other process). Leaving a ``with``
        block of a reconnected VM does not delete it."""
        return cls._wrap(_native.Vm.open(vm_id), owner=False, ssh_key_path=ssh_key_path)

    @classmethod
    def from_snapshot(
        cls,
        name: str,
        *,
        ssh_key_path: Optional[Union[str, "os.PathLike[str]"]] = None,
        **overrides: Any,
    ) -> "SmolVM":
        """A new running VM that continues from snapshot ``name`` (see :meth:`snapshot`):
        its memory, processes and files as they were, with its own identity (hostname,
        address, randomness). It is configured like the snapshot's VM; ``overrides`` are
        :class:`VMConfig` fields, each honoured or refused by one rule (the same as
        ``smolvm create --from-snapshot``'s):

        - ``vm_id``, ``retain_disk_on_delete``, ``egress``, ``allow_egress``,
          ``deny_egress`` apply; ``env_vars`` are set on top of the environment the saved
          guest already has;
        - ``network`` applies within what the saved network device allows (a snapshot taken
          on ``"nat"`` restores on ``"nat"`` only, one without a network device on
          ``"none"`` only); ``"auto"`` keeps the snapshot's;
        - ``vcpu_count``, ``mem_size_mib``, ``image``, ``kernel_path``, ``initrd_path``,
          ``rootfs_path``, ``boot_args`` and ``disk_size_mib`` must be the snapshot's own
          (the saved memory, kernel command line and disk fix them); ``disk_mode`` must be
          ``"isolated"``, ``snapshot`` True, and ``disk_path`` is refused.

        A refused option raises :class:`~smolvm.exceptions.ValidationError` naming it
        (``field``) and nothing is created; a missing snapshot raises
        :class:`~smolvm.exceptions.SnapshotNotFoundError`. A VM that does not start is
        deleted.

        Lifetime as for ``SmolVM()``: without ``vm_id`` it belongs to this process."""
        owned = overrides.get("vm_id") is None
        native, timings = _native.Vm.create_started_from_snapshot(name, overrides, owned)
        vm = cls._wrap(
            native,
            owner=True,
            ssh_key_path=os.fspath(ssh_key_path) if ssh_key_path is not None else None,
        )
        vm.last_start_timings = timings
        return vm

    # -- identity and state ----------------------------------------------------------

    @property
    def vm_id(self) -> str:
        """The VM's id."""
        return self._native.id

    @property
    def status(self) -> VMState:
        """The VM's current state (checked against its processes, never stale)."""
        return VMState(self._native.info()["state"])

    @property
    def info(self) -> Dict[str, Any]:
        """Everything recorded about the VM: state, error, ip, accelerator, config, times."""
        return self._native.info()

    @property
    def config(self) -> VMConfig:
        """The configuration the VM was created with (environment values are not kept)."""
        return VMConfig(**self._native.info()["config"])

    @property
    def ssh_key_path(self) -> Optional[str]:
        """The private key given for SSH access to this VM, if any."""
        return self._ssh_key_path

    def get_ip(self) -> Optional[str]:
        """The guest's address on its network (``nat``: its own 172.16.x.y; ``user``:
        10.0.2.15 behind QEMU's NAT), or None with network ``none``."""
        ip: Optional[str] = self._native.info()["ip"]
        return ip

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> "SmolVM":
        """Boots the VM and waits until commands can run (does nothing if it runs)."""
        self.last_start_timings = self._native.start()
        return self

    def stop(self, graceful: bool = True) -> "SmolVM":
        """Stops the VM: a clean guest shutdown first (unless ``graceful=False``). Its disk
        is kept for the next :meth:`start`."""
        self._native.stop(graceful)
        return self

    def delete(self) -> Optional[str]:
        """Stops and deletes the VM and everything it had; returns where a retained disk
        was moved (``retain_disk_on_delete``), else None."""
        return self._native.delete()

    def pause(self) -> "SmolVM":
        """Freezes the VM's vCPUs: guest processes and clocks stop until :meth:`resume`
        (:attr:`status` is ``PAUSED``; commands raise
        :class:`~smolvm.exceptions.CommandExecutionUnavailableError` meanwhile)."""
        self._native.pause()
        return self

    def resume(self) -> "SmolVM":
        """Lets a paused VM run again."""
        self._native.resume()
        return self

    def snapshot(self, name: str) -> SnapshotInfo:
        """Saves the running (or paused) VM as snapshot ``name`` (1 to 63 letters, digits,
        ``.``, ``_``, ``-``): memory, devices and disk at one instant. The VM goes on
        running. :meth:`from_snapshot` starts new VMs from it; :func:`delete_snapshot`
        removes it. The files hold guest memory and are readable by their owner only."""
        return SnapshotInfo._from_native(self._native.snapshot(name))

    def fork(self, n: int = 1) -> List["SmolVM"]:
        """``n`` new running VMs (1 to 64) that continue from this VM's present state
        (memory, processes, files), each with its own hostname, address and randomness.
        They belong to whoever this VM belongs to; each is usable as a context manager
        (deleted on exit)."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        natives = self._native.fork(n)
        return [type(self)._wrap(v, owner=True, ssh_key_path=self._ssh_key_path) for v in natives]

    def close(self) -> None:
        """Lets go of the VM without stopping it: it keeps running after this process ends
        (reconnect with :meth:`from_id`)."""
        if self._owner and self._native.info().get("owned"):
            self._native.detach()

    def __enter__(self) -> "SmolVM":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._owner:
            self.delete()

    def __repr__(self) -> str:
        return f"SmolVM(vm_id={self.vm_id!r})"

    # -- commands ---------------------------------------------------------------------

    def run(
        self,
        command: Command,
        timeout: Optional[float] = 30,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        *,
        stdin: Union[None, str, bytes] = None,
        on_stdout: Optional[OutputCallback] = None,
        on_stderr: Optional[OutputCallback] = None,
        max_output_bytes: Optional[int] = None,
    ) -> CommandResult:
        """Runs ``command`` (a shell line, or a list of program and arguments) and returns
        its result; a non-zero exit is a result, not an exception.

        ``timeout`` (seconds, None for none): past it the command is killed with its
        process group and :class:`~smolvm.exceptions.OperationTimeoutError` is raised.
        ``env`` adds variables, ``cwd`` sets the directory, ``stdin`` feeds input.
        ``on_stdout``/``on_stderr`` get the output as text while it comes. Ctrl-C kills the
        command in the guest and raises KeyboardInterrupt.
        """
        d = self._native.run(
            command,
            timeout,
            dict(env) if env is not None else None,
            cwd,
            _stdin_bytes(stdin),
            _text_callback(on_stdout),
            _text_callback(on_stderr),
            max_output_bytes,
        )
        return CommandResult._from_native(d)

    def stream(
        self,
        command: Command,
        timeout: Optional[float] = None,
        env: Optional[Mapping[str, str]] = None,
        cwd: Optional[str] = None,
        *,
        stdin: Union[None, str, bytes] = None,
    ) -> CommandStream:
        """Starts ``command`` and returns an iterator over its output chunks as they come
        (:class:`OutputChunk`); its ``result`` is set when the output ends."""
        native = self._native.stream(
            command, timeout, dict(env) if env is not None else None, cwd, _stdin_bytes(stdin)
        )
        return CommandStream(native)

    # -- environment ------------------------------------------------------------------

    def set_env_vars(self, env_vars: Mapping[str, str], *, merge: bool = True) -> List[str]:
        """Sets environment variables for every later command (kept in the guest, also in
        /etc/profile.d/smolvm_env.sh; values never reach smolvm's database). Returns the
        names now set."""
        return sorted(self._native.set_env_vars(dict(env_vars), merge))

    def unset_env_vars(self, keys: Sequence[str]) -> Dict[str, str]:
        """Removes environment variables; returns those left."""
        return self._native.unset_env_vars(list(keys))

    def list_env_vars(self) -> Dict[str, str]:
        """The persistent environment variables."""
        return self._native.env_vars()

    # -- files ------------------------------------------------------------------------

    def write_file(self, path: str, data: Union[str, bytes], mode: Optional[int] = None) -> None:
        """Writes ``data`` to the absolute guest ``path`` (parents made; the file appears
        whole or not at all). ``mode`` (e.g. ``0o755``) sets its permissions."""
        self._native.write_file(path, _stdin_bytes(data) or b"", mode)

    def read_file(self, path: str, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
        """Reads a guest file; files over ``max_bytes`` raise FileTransferError."""
        return self._native.read_file(path, max_bytes)

    def upload(self, local_path: Union[str, "os.PathLike[str]"], remote_path: str) -> str:
        """Copies a host file into the guest, streamed, keeping its permissions. A
        ``remote_path`` ending in ``/`` means "into this directory". Returns the guest path."""
        return self._native.upload(os.fspath(local_path), remote_path)

    def download(
        self,
        remote_path: str,
        local_path: Union[str, "os.PathLike[str]"],
        max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> str:
        """Copies a guest file to the host, streamed, keeping its permissions. A
        ``local_path`` that is a directory receives it under the same name. Returns the
        host path."""
        return self._native.download(remote_path, os.fspath(local_path), max_bytes)

    # The original SDK's names.
    upload_file = upload
    download_file = download

    # -- ports ------------------------------------------------------------------------

    def expose_local(
        self, guest_port: int, host_port: Optional[int] = None, *, bind: Optional[str] = None
    ) -> int:
        """Serves the guest's ``guest_port`` (listening on its loopback or any address) on
        the host at ``bind`` (127.0.0.1 unless given) : ``host_port`` (a free one when None)
        and returns the host port. The forward runs through the agent channel, so it works
        without a guest network; it lasts as long as the VM (also across stop/start and
        after this process ends) or until :meth:`unexpose_local`."""
        port: int = self._native.expose_local(guest_port, host_port, bind)["host_port"]
        return port

    def unexpose_local(self, host_port: int, guest_port: Optional[int] = None) -> None:
        """Removes the forward on ``host_port`` (``guest_port`` is accepted for the
        original SDK's signature)."""
        self._native.unexpose(host_port)

    def list_forwards(self) -> List[Dict[str, Any]]:
        """The VM's port forwards: dicts of ``host_addr``, ``host_port``, ``guest_port``."""
        return self._native.forwards()


def list_snapshots() -> List[SnapshotInfo]:
    """Every saved snapshot (and the states kept for forks, ``kind="fork"``), by name."""
    return [SnapshotInfo._from_native(d) for d in _native.list_snapshots()]


def get_snapshot(name: str) -> SnapshotInfo:
    """The snapshot ``name`` (:class:`~smolvm.exceptions.SnapshotNotFoundError` if none)."""
    return SnapshotInfo._from_native(_native.open_snapshot(name))


def delete_snapshot(name: str) -> None:
    """Removes snapshot ``name``. Refused with :class:`~smolvm.exceptions.SnapshotError`
    while VMs made from it exist (their disks build on it): delete them first."""
    _native.delete_snapshot(name)
