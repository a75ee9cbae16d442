"""Which of tplab's files one decode step crosses, from ``python -m tplab generate`` to a token.

Runs the command in this process (the bundled tiny model, thread ranks) under a profiler that notes every tplab
file whose code runs while the generation loop is in a decode step, and the files of every frame on the stacks of
the threads at that moment (the command and the launcher on the main thread). Prints the count and the files.

    python scripts/trace_decode_step.py [--tp 2]
"""
from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

import tplab
from tplab.cli import main as tplab_main

PACKAGE = Path(tplab.__file__).resolve().parent


def in_decode_step(frame) -> bool:
    """Whether a frame of the generation loop below ``frame`` is past its first (prefill) step."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "generate" and code.co_filename.endswith("engine/generate.py"):
            return isinstance(frame.f_locals.get("step"), int) and frame.f_locals["step"] >= 1
        frame = frame.f_back
    return False


def trace(tp: int) -> set[str]:
    files: set[str] = set()

    def note(frame, event, arg):
        if event != "call" or not frame.f_code.co_filename.startswith(str(PACKAGE)) or not in_decode_step(frame):
            return
        for top in sys._current_frames().values():
            while top is not None:
                if top.f_code.co_filename.startswith(str(PACKAGE)):
                    files.add(str(Path(top.f_code.co_filename).resolve().relative_to(PACKAGE.parent)))
                top = top.f_back

    threading.setprofile(note)
    sys.setprofile(note)
    try:
        tplab_main(["generate", "--tp", str(tp), "--max-new-tokens", "2", "--prompt-ids", "1,2,3", "--threads", "1"])
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return files


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    crossed = sorted(trace(parser.parse_args().tp))
    print(f"one decode step crosses {len(crossed)} files of tplab:")
    print("\n".join(f"  {f}" for f in crossed))
