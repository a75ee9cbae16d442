"""A wheel install carries the data the package reads, and runs generate, plan and bench from outside the repo."""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

from tplab.paths import CHECKOUT_DIR, PACKAGE_DIR

PYPROJECT = tomllib.loads((CHECKOUT_DIR / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_subpackage_and_data_folder_is_in_the_wheel_list():
    listed = set(PYPROJECT["packages"])
    code = {".".join(p.parent.relative_to(CHECKOUT_DIR).parts) for p in PACKAGE_DIR.rglob("__init__.py")}
    assert code <= listed, f"add {sorted(code - listed)} to pyproject.toml's packages"
    data = CHECKOUT_DIR / "data"
    kept_in_the_checkout = {"measurements", "published"}  # records, and the published figures the fit reads
    shipped = {"tplab.data." + ".".join(p.relative_to(data).parts) for p in data.rglob("*")
               if p.is_dir() and not kept_in_the_checkout & set(p.relative_to(data).parts)}
    assert shipped <= listed, f"add {sorted(shipped - listed)} to pyproject.toml's packages and package-data"


@pytest.fixture(scope="module")
def wheel_python(tmp_path_factory) -> Path:
    """A fresh venv holding only the built wheel; torch & co. come from this interpreter's site-packages (a .pth)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # build from a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(CHECKOUT_DIR, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", "measurements", "notebooks", "tests", ".ipynb_checkpoints"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    str(source), "-w", str(root / "dist")], check=True)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", *map(str, (root / "dist").glob("tplab-*.whl"))], check=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def run_outside(python: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "tplab", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_a_wheel_install_runs_generate_plan_and_bench_from_outside_the_repo(wheel_python, tmp_path):
    where = subprocess.run([str(wheel_python), "-c", "import tplab.paths as p; print(p.DATA_DIR, p.in_checkout())"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.split()
    assert "site-packages" in where[0] and where[1] == "False"
    generated = run_outside(wheel_python, tmp_path, "generate", "--tp", "2", "--max-new-tokens", "4",
                            "--prompt", "The with statement")
    assert generated.returncode == 0, generated.stderr
    assert "tp=2" in generated.stdout
    planned = run_outside(wheel_python, tmp_path, "plan", "--model", "llama-3-70b", "--gpu", "h100-sxm",
                          "--tp", "2,4,8", "--batch", "1")
    assert planned.returncode == 0, planned.stderr
    assert "llama-3-70b" in planned.stdout.lower()
    benched = run_outside(wheel_python, tmp_path, "bench", "--tp", "1", "--prompt-len", "8", "--decode-steps", "2",
                          "--repeats", "1", "--warmup", "0", "--no-baseline", "--quick-roofline", "--quiet")
    assert benched.returncode == 0, benched.stderr
    assert len(list(tmp_path.glob("*_measured_*.jsonl"))) == 1  # written to the current directory
    assert not list(Path(where[0]).rglob("*.jsonl"))  # never into site-packages


def test_the_install_paths_agree_and_a_cpu_only_machine_has_one():
    project = tomllib.loads((CHECKOUT_DIR / "pyproject.toml").read_text())
    assert project["project"]["license"] == "Apache-2.0"  # an SPDX string: setuptools warns about a table
    assert any(r.startswith("setuptools>=77") for r in project["build-system"]["requires"])
    environment = (CHECKOUT_DIR / "environment.yml").read_text()
    assert "- -c constraints.txt" in environment and '- -e ".[dev]"' in environment  # what make setup installs
    dry = subprocess.run(["make", "-n", "-B", "setup", "TORCH_INDEX=https://example.invalid/cpu"], cwd=CHECKOUT_DIR,
                         capture_output=True, text=True, check=True).stdout
    torch_first = next(line for line in dry.splitlines() if "TORCH_INDEX" in line or "--index-url" in line)
    assert "https://example.invalid/cpu" in torch_first and "grep '^torch==' constraints.txt" in torch_first
    assert dry.index("--index-url") < dry.index("-c constraints.txt -e")


def test_building_the_wheel_gives_no_setuptools_warning(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(CHECKOUT_DIR, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", "measurements", "notebooks", "tests"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v",
                           str(source), "-w", str(tmp_path / "dist")], capture_output=True, text=True, check=True)
    warnings = [line for line in (done.stdout + done.stderr).splitlines()
                if "DeprecationWarning" in line or "BuildBackendWarning" in line or "is deprecated" in line
                or "is absent from the `packages` configuration" in line]
    assert not warnings, warnings
