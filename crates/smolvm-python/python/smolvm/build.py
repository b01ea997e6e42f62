"""Building images: :class:`ImageBuilder` derives SSH-capable images from the default one."""

from __future__ import annotations

import os
from typing import Optional, Tuple, Union

from . import _native

__all__ = ["ImageBuilder", "SSH_BOOT_ARGS"]

#: Kernel arguments of the original SDK's SSH images; smolvm's own arguments already do
#: what they ask, so passing them as ``boot_args`` changes nothing and is accepted.
SSH_BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda rw init=/init"


class ImageBuilder:
    """Makes images in ``cache_dir`` (default: smolvm's images directory, where the
    default image built by ``smolvm image build`` lives)."""

    def __init__(self, cache_dir: Optional[Union[str, "os.PathLike[str]"]] = None) -> None:
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else _native.default_images_dir()
        #: The last built image's pinned host key, for ``ssh -o UserKnownHostsFile=...``.
        self.known_hosts: Optional[str] = None
        #: Its name in ``known_hosts``, for ``ssh -o HostKeyAlias=...``.
        self.host_key_alias: Optional[str] = None

    def build_debian_ssh_key(
        self,
        ssh_public_key: Union[str, "os.PathLike[str]"],
        name: str = "debian-ssh-key",
        rootfs_size_mb: int = 2048,
        base_image: str = "default",
    ) -> Tuple[str, str]:
        """Makes (or reuses) the image ``name``: the Debian default image whose guest also
        runs an SSH server that accepts ``ssh_public_key`` (the key, or a path to a .pub
        file) as root, with a host key made on this host and pinned in the image's
        ``known_hosts``. Returns ``(kernel_path, rootfs_path)`` for :class:`VMConfig`.
        Takes seconds: no download, the base image is copied and the keys written in."""
        kernel, rootfs, known_hosts, alias = _native.build_ssh_image(
            os.fspath(ssh_public_key), name, rootfs_size_mb, base_image, self.cache_dir
        )
        self.known_hosts = known_hosts
        self.host_key_alias = alias
        return kernel, rootfs
