"""A user's files: read only what is a readable regular file of a sane size; write safely: check the target
first, never replace a file silently, replace atomically.

* :func:`read_user_text`: a file named by a flag, refused in one line when it is missing, a folder, a pipe or a
  device, unreadable, too large or not text.

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
import stat
import tempfile
from pathlib import Path
from typing import Callable

USER_FILE_LIMIT = 100_000_000  # bytes: a prompt list, a load trace or a config is far smaller


def read_user_text(path: str | Path, what: str, limit: int = USER_FILE_LIMIT) -> str:
    """The text of the file ``path`` (named by ``what``, e.g. "--prompts"); a ValueError in one line otherwise."""
    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{what} {path} is not a regular file (a folder, a pipe or a device): give a file")
        if info.st_size > limit:
            raise ValueError(f"{what} {path} holds {info.st_size:,} bytes, more than {limit:,}: is it the right file?")
        return path.read_text()
    except FileNotFoundError:
        raise ValueError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not UTF-8 text") from None


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
