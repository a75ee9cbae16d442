"""Run ``python -m tplab`` in this process, for the tests of the command line."""
from __future__ import annotations

from tplab.cli import main


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``tplab argv...``; argparse's own exits count as exit codes."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
