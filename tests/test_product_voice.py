"""The product speaks of itself only: no issue numbers, leases or sessions of its makers in what ships."""
from __future__ import annotations

import re

from tplab.paths import CHECKOUT_DIR

MAKERS_WORDS = re.compile(r"\bissue #\d+|\bthe issue's\b|\blease\b|\bsessions?\b(?!\.sh)", re.IGNORECASE)


def test_no_issue_numbers_leases_or_sessions_in_what_ships():
    files = [p for pattern in ("tplab/**/*.py", "notebooks/*.ipynb", "data/**/*.json", "data/**/*.md", "README.md",
                               "scripts/*") for p in CHECKOUT_DIR.glob(pattern)]
    found = []
    for path in files:
        if path.name == "tokenizer.json":
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            hits = [m.group(0) for m in MAKERS_WORDS.finditer(line) if "gpu_session" not in line]
            if hits:
                found.append(f"{path.relative_to(CHECKOUT_DIR)}:{number}: {hits}")
    assert not found, "\n".join(found)
