"""PEP 517 backend: maturin, after building the `smolvm` binary that the package carries
(each VM's supervisor runs it), so one `pip install` gives a working SDK."""

import os
import shutil
import subprocess
from pathlib import Path

import maturin
from maturin import *  # noqa: F401,F403  (the hooks we do not override)

_HERE = Path(__file__).resolve().parent.parent
_WORKSPACE = _HERE.parent.parent


def _bundle_cli() -> None:
    subprocess.run(
        ["cargo", "build", "--release", "--locked", "-p", "smolvm-cli"],
        cwd=_WORKSPACE,
        check=True,
    )
    target = Path(os.environ.get("CARGO_TARGET_DIR", _WORKSPACE / "target"))
    dest = _HERE / "python" / "smolvm" / "_bin"
    dest.mkdir(exist_ok=True)
    shutil.copy2(target / "release" / "smolvm", dest / "smolvm")


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _bundle_cli()
    return maturin.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    _bundle_cli()
    return maturin.build_editable(wheel_directory, config_settings, metadata_directory)
