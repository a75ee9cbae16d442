"""Bad input through the real command line (``python -m tplab`` in a subprocess): exit status 2, one line on
stderr, no traceback, nothing written to stdout. One case per class of bad input; the in-process tests next to each
command cover the many values of each class."""
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "data" / "tiny"
SIM = ["simulate", "--model", "llama-3-70b", "--gpu", "h100-sxm", "--tp", "4"]


def _damaged(tmp: Path, name: str, config: dict | None = None, weights: bytes | None = None) -> str:
    folder = tmp / name
    shutil.copytree(TINY, folder)
    if config is not None:
        original = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**original, **config}))
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return str(folder)


def _cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    fifo = tmp / "pipe"
    os.mkfifo(fifo)
    notes = tmp / "notes.txt"
    notes.write_text("mine\n")
    generate = ["generate", "--prompt-ids", "1,2", "--max-new-tokens", "2", "--model"]
    return {
        "config field": (generate + [_damaged(tmp, "field", {"head_dim": "32"})], "head_dim must be a positive integer"),
        "absurd config size": (generate + [_damaged(tmp, "layers", {"num_hidden_layers": 10**9})], "is more than 10,000"),
        "damaged header": (generate + [_damaged(tmp, "header", weights=(1 << 62).to_bytes(8, "little") + b"{}")],
                           "is not a readable safetensors file"),
        "pipe for a file": (["quality", "--quant", "int8", "--prompts", str(fifo)], "is not a regular file"),
        "absurd size": (SIM + ["--num-requests", "1000000000000000000"], "is more than 1,000,000"),
        "absurd threads": (["serve-bench", "--threads", "100000", "--no-save"], "--threads=100000 is more than"),
        "NaN": (SIM + ["--slo-ttft-ms", "nan"], "--slo-ttft-ms must be a finite number > 0, got nan"),
        "zero": (SIM + ["--num-blocks", "0"], "--num-blocks must be a positive integer, got 0"),
        "a user's file as --out": (["serve-bench", "--num-requests", "2", "--out", str(notes)], "is a file, not a folder"),
    }


def test_every_class_of_bad_input_exits_2_with_one_line(tmp_path):
    """Every case in a process of its own, two at a time (each mostly imports torch)."""
    cases = _cases(tmp_path)
    with ThreadPoolExecutor(2) as pool:
        runs = pool.map(lambda argv: subprocess.run([sys.executable, "-m", "tplab", *argv], cwd=REPO,
                                                    capture_output=True, text=True, timeout=120),
                        [argv for argv, _ in cases.values()])
    failures = []
    for (name, (_, message)), done in zip(cases.items(), runs):
        lines = done.stderr.strip().splitlines()
        if done.returncode != 2 or done.stdout or len(lines) != 1 or message not in lines[0]:
            failures.append(f"{name}: exit {done.returncode}, stderr {done.stderr[-500:]!r}")
    assert not failures, "\n".join(failures)
    assert (tmp_path / "notes.txt").read_text() == "mine\n"


@pytest.mark.parametrize("argv", [["plan", "--model", "llama-3-70b", "--gpu", "h100-sxm", "--price", "-1"]])
def test_argparse_errors_are_one_line_too(argv):
    done = subprocess.run([sys.executable, "-m", "tplab", *argv], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "usage:" not in done.stderr
