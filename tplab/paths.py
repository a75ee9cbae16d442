"""Where tplab's data lives: the repository's ``data/`` in a checkout, ``tplab/data`` in an installed wheel.

The repository keeps one ``data/`` at its top (the tiny model, the hardware and
model specs, efficiency.json, the measurement records). A wheel carries the
part the package reads, mapped to ``tplab/data`` by pyproject.toml's
``package-dir`` (no second copy in git): the measurement records stay in the
repository. What the command line records goes to ``data/measurements/local`` in a checkout (ignored by git: a
run leaves the checkout clean; commit a record by moving it up) and to the current directory elsewhere, never
into site-packages. The repository's measurement scripts write to ``data/measurements`` itself.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_DIR = PACKAGE_DIR.parent
_INSTALLED_DATA = PACKAGE_DIR / "data"  # only exists in a wheel install
DATA_DIR = _INSTALLED_DATA if _INSTALLED_DATA.is_dir() else CHECKOUT_DIR / "data"
INCOMPLETE_DATA = ("tplab's data is incomplete; reinstall tplab from its repository "
                   "(pip install -c constraints.txt ., or pip install -e . to work in the checkout)")


def in_checkout() -> bool:
    """Whether tplab runs from its repository (editable install or PYTHONPATH), not from an installed wheel."""
    return DATA_DIR == CHECKOUT_DIR / "data" and (CHECKOUT_DIR / "pyproject.toml").is_file()


def default_measurements_dir() -> Path:
    """Where the repository's measurement scripts write: data/measurements in a checkout, else the current directory."""
    return DATA_DIR / "measurements" if in_checkout() else Path.cwd()


def local_records_dir() -> Path:
    """Where ``bench`` and ``serve-bench`` records go unless ``--out`` says: data/measurements/local in a checkout
    (ignored by git), else the current directory."""
    return DATA_DIR / "measurements" / "local" if in_checkout() else Path.cwd()
