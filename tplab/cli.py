"""``python -m tplab <command>``: the command-line entry point."""
from __future__ import annotations

import argparse
import sys

from tplab.commands import HelpFormatter, bench, comm_bench, demo, generate, plan, quality, serve_bench, simulate

COMMANDS = [demo, generate, plan, bench, comm_bench, quality, serve_bench, simulate]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tplab", description="tensor parallelism for LLM inference")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    for sub in subparsers.choices.values():  # every option's help shows its default
        sub.formatter_class = HelpFormatter
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
