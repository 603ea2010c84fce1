"""Helpers of the deploy checks: run a tool, find free ports, make API keys."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS_BIN = REPO / "deploy" / ".venv-tools" / "bin"
RAY_BIN = REPO / "deploy" / ".venv-ray" / "bin"


def run(
    command: Sequence[str | Path],
    *,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
    timeout: float = 600,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure, fail the test with its output."""
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, command))} exited {result.returncode}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
        )
    return result


def tool(name: str) -> Path:
    """A deploy tool from deploy/.venv-tools, or the PATH (kubectl, docker-compose)."""
    candidate = TOOLS_BIN / name
    if candidate.exists():
        return candidate
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run deploy/ci/setup.sh")
    return Path(found)


def free_ports(count: int, low: int = 20000, high: int = 29999) -> list[int]:
    """`count` distinct free TCP ports on 127.0.0.1, outside Ray's worker range 10002-19999."""
    held: list[socket.socket] = []
    try:
        for port in range(low + os.getpid() % 5000, high):
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            held.append(sock)
            if len(held) == count:
                return [s.getsockname()[1] for s in held]
        raise RuntimeError("not enough free ports")
    finally:
        for sock in held:
            sock.close()


def new_key(keys_file: Path, name: str, scope: str) -> str:
    """Append an API key to `keys_file` with `safesteer keys add`; returns the key."""
    safesteer = REPO / ".venv" / "bin" / "safesteer"
    if not safesteer.exists():
        safesteer = RAY_BIN / "safesteer"
    result = run(
        [safesteer, "keys", "add", "--keys-file", keys_file, "--name", name, "--scope", scope]
    )
    return result.stdout.strip().splitlines()[-1]
