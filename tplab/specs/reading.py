"""Reading the shipped data files, and the one error for a name that is not among them."""
from __future__ import annotations

import json
from pathlib import Path

from tplab.paths import INCOMPLETE_DATA


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"{path} does not exist: {INCOMPLETE_DATA}")
    return json.loads(path.read_text())


def unknown_name(kind: str, name: object, known: list[str], hint: str = "") -> ValueError:
    return ValueError(f"unknown {kind} {name!r}; known: {', '.join(known)}{hint}")


