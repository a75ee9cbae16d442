"""Writing a user's files safely: check the target first, never replace a file silently, replace atomically.

* :func:`check_writable`: before any work, that a file can be created at a
  path (its folder exists or can be made, and accepts a new file), so a long
  measurement is never lost to an unwritable ``--out``.
* :func:`write_new_file`: refuse an existing file unless ``force``; write the
  text to a temporary file beside the target, validate that file, and only
  then rename it over the target (``os.replace`` is atomic on one file
  system), so a failed write or a failed check leaves the old file as it was.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def check_writable(path: str | Path) -> Path:
    """``path`` if a new file can be written there; a ValueError saying why not otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".check"):
            pass
    except OSError as e:
        raise ValueError(f"cannot write {path}: {e.strerror or e}; choose another place") from None
    return path


def write_new_file(path: str | Path, text: str, force: bool = False,
                   validate: Callable[[Path], object] | None = None) -> Path:
    """Write ``text`` to ``path`` atomically, after ``validate(temporary_path)`` passed.

    An existing ``path`` is replaced only with ``force=True`` (the CLI's ``--force``).
    """
    path = Path(path)
    if path.exists() and not force:
        raise ValueError(f"{path} exists; pass --force to replace it, or choose another file")
    check_writable(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if validate is not None:
            validate(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
