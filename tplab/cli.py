"""``python -m tplab <command>``: the command-line entry point.

Ctrl-C ends any command the same way: the launcher stops every rank, one line says so, and the process exits with
status 130 (128 + SIGINT), before any record is written (records are written whole, at the end of a run).
"""
from __future__ import annotations

import os
import sys
import threading

from tplab.commands import (
    HelpFormatter,
    OneLineParser,
    bench,
    comm_bench,
    demo,
    generate,
    plan,
    quality,
    serve_bench,
    simulate,
)

COMMANDS = [demo, generate, plan, bench, comm_bench, quality, serve_bench, simulate]


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m tplab", description="tensor parallelism for LLM inference")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    for sub in subparsers.choices.values():  # every option's help shows its default
        sub.formatter_class = HelpFormatter
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except BaseException as e:
        if not interrupted(e):
            raise
        print(f"interrupted: tplab {args.command} stopped every rank; nothing was recorded", file=sys.stderr)
        if any(t.name.startswith("tplab-rank") and t.is_alive() for t in threading.enumerate()):
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)  # a thread rank still in a kernel must not run into the interpreter's shutdown
        return 130


def interrupted(error: BaseException) -> bool:
    """Whether ``error`` is a Ctrl-C, or was caused by one (transformers' lazy imports re-raise a KeyboardInterrupt as
    a ModuleNotFoundError ``from`` it)."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__cause__
    return False


if __name__ == "__main__":
    sys.exit(main())
