"""Where and with what a measurement was taken: device, driver, CUDA, versions, git commit, date, load.

Every record of ``data/measurements/`` carries this ``env`` dict, so a number
can always be traced to its hardware and code. Nothing here is guessed: a
field that cannot be read (no nvidia-smi, not a git checkout) is None.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

from tplab.paths import CHECKOUT_DIR
from tplab.specs import cpu
from tplab.version import __version__

REPO_DIR = CHECKOUT_DIR
ISA_FLAG_PREFIXES = ("sse", "avx", "amx", "fma", "f16c")


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


COMMIT_VARIABLE = "TPLAB_GIT_COMMIT"


def git_commit() -> dict:
    """{"commit", "dirty"} of the tplab checkout (None when unknown).

    A copy of a checkout without its .git (a remote GPU machine, say) reads
    the commit from the environment variable TPLAB_GIT_COMMIT, set by whoever
    made the copy; "dirty" is then unknown (None) and "source" says so.
    """
    commit = _run(["git", "rev-parse", "HEAD"], REPO_DIR)
    if commit is None and os.environ.get(COMMIT_VARIABLE):
        return {"commit": os.environ[COMMIT_VARIABLE], "dirty": None,
                "source": f"${COMMIT_VARIABLE}: a copy of the checkout, not a git checkout itself"}
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], REPO_DIR) if commit else None
    return {"commit": commit, "dirty": None if commit is None else bool(status)}


def device_info(device: torch.device) -> dict:
    """The device that computed: {"type", "name", "count", "driver", "cuda", "memory_bytes"}."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={device.index or 0}"])
        return {"type": "cuda", "name": props.name, "count": torch.cuda.device_count(), "driver": driver,
                "cuda": torch.version.cuda, "memory_bytes": props.total_memory}
    return {"type": "cpu", "name": cpu_name(), "count": os.cpu_count(), "driver": None, "cuda": None,
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}


def load_average() -> list[float] | None:
    """1-, 5- and 15-minute load averages: other work on a shared machine slows CPU measurements."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device | str) -> dict:
    """The ``env`` dict of a measurement record."""
    device = torch.device(device)
    return {
        "device": device_info(device),
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "cpu_flags": sorted(f for f in cpu.cpu_flags() if f.startswith(ISA_FLAG_PREFIXES)),  # what the kernels may use
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "tplab": __version__,
        "python": platform.python_version(),
        "git": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": load_average(),
    }


def hardware_slug(env: dict) -> str:
    """A file-name-safe name of the device, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-intel-xeon-processor``."""
    device = env["device"]
    name = device["name"] if device["type"] == "cuda" else f"cpu {device['name']}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("(r)", "")).strip("-")
