"""Where the files that ship with the package are, in a wheel and in a clone alike."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """The Hydra configs: ``personafuse/conf`` in a wheel (mapped from ``conf/``), ``conf/`` in a clone."""
    installed = Path(__file__).parent / "conf"
    return installed if installed.is_dir() else PACKAGE_DIR.parent / "conf"
