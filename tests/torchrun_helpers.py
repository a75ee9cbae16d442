"""Start a command under torchrun the way the README does, for tests and notebooks.

The README's form is static rendezvous (``torchrun --nproc-per-node N ...``). Tests pin
the address to 127.0.0.1 and take a port that is free now, so two runs never contend for
torchrun's default port 29500 and nothing depends on how the machine resolves its name
(``--standalone``'s c10d rendezvous does).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys


def free_port() -> int:
    """A TCP port on 127.0.0.1 that no one holds at the moment of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_outside_torchrun() -> dict[str, str]:
    """This process's environment without RANK, WORLD_SIZE and LOCAL_RANK, so that a child
    started from a test that itself runs under torchrun does not join that group."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


def run_under_torchrun(nproc: int, module_args: list[str], timeout: float = 300,
                       cwd: str | None = None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node nproc -m <module_args>``, output captured.

    A port taken between the probe and torchrun's bind is retried once, on a new port.
    The child's environment is ``env_outside_torchrun()``.
    """
    env = env_outside_torchrun()

    def attempt() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                               "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                               "-m", *module_args],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)

    done = attempt()
    if done.returncode != 0 and "address already in use" in done.stderr.lower():
        done = attempt()
    return done


def stdout_or_raise(done: subprocess.CompletedProcess) -> str:
    """The command's stdout, or an AssertionError that shows its exit status and stderr."""
    if done.returncode != 0:
        raise AssertionError(f"{done.args} exited {done.returncode}\nstderr:\n{done.stderr[-4000:]}")
    return done.stdout
