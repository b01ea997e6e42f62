"""The friendly facade of the seeds: :class:`VM`, a :class:`~smolvm.SmolVM` that configures
itself from the default image and reconnects by name."""

from __future__ import annotations

from typing import Any, Optional

from . import _native
from .exceptions import VMNotFoundError
from .types import VMConfig
from .vm import SmolVM

__all__ = ["VM"]


class VM(SmolVM):
    """``VM()`` is a fresh VM from the default image; ``VM(vm_id="name")`` reconnects to
    the VM of that name when it exists and creates it otherwise (a named VM lives until
    deleted). Other keyword arguments are :class:`VMConfig` fields."""

    def __init__(self, config: Optional[VMConfig] = None, *, vm_id: Optional[str] = None, **fields: Any) -> None:
        if config is None and vm_id is not None:
            try:
                native = _native.Vm.open(vm_id)
            except VMNotFoundError:
                native = None
            if native is not None:
                self._native = native
                self._owner = False
                self._ssh_key_path = fields.pop("ssh_key_path", None)
                self.last_start_timings = None
                return
        if vm_id is not None:
            fields["vm_id"] = vm_id
        super().__init__(config, **fields)
