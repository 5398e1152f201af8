"""Start a real sekmet-fhir R4 server on loopback for the duration of a ``with`` block.

Not a fixture itself: ``tests/conftest.py`` and the FHIR integration tests wrap it. The server
lives in its own venv (its pins differ from ours), so it runs as a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_CHARS = 4000


def free_port() -> int:
    """A loopback port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(workdir: Path, port: int) -> Path:
    """The server's YAML config (JSON strings are valid YAML scalars, so no yaml dependency)."""
    base_url = f"http://127.0.0.1:{port}/fhir"
    lines = [
        "host: 127.0.0.1",
        f"port: {port}",
        f"base_url: {json.dumps(base_url)}",
        f"db_path: {json.dumps(str(workdir / 'sekmet.db'))}",
        "simulator:",
        "  enabled: false",
        "validation:",
        "  inbound: strict",
        "log_inbound: false",
    ]
    path = workdir / "sekmet.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@contextlib.contextmanager
def running_fhir_server(venv: Path, workdir: Path, port: int | None = None) -> Iterator[str]:
    """Yield the base URL (``http://127.0.0.1:PORT/fhir``) of a server whose database lives in
    ``workdir``: empty the first time; the same workdir and ``port`` again is the same server
    back after an outage, with what it stored."""
    venv, workdir = venv.resolve(), workdir.resolve()  # the server runs with cwd=workdir
    exe = venv / "bin" / "sekmet"
    if not exe.exists():
        raise RuntimeError(f"{exe} not found: run `make fhir-server-install`")
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = write_config(workdir, port)
    base_url = f"http://127.0.0.1:{port}/fhir"
    log_path = workdir / "sekmet.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [str(exe), "serve", "--config", str(config)],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_ready(process, base_url, log_path)
        yield base_url
    finally:
        _stop(process)


def _wait_ready(process: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"sekmet exited with {process.returncode} before it was ready; log tail:\n"
                f"{_tail(log_path)}"
            )
        try:
            response = httpx.get(f"{base_url}/metadata", timeout=2.0)
            if response.status_code == 200:
                return
            last_error = f"GET /metadata -> {response.status_code}"
        except httpx.TransportError as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    _stop(process)
    raise RuntimeError(
        f"sekmet not ready after {READY_TIMEOUT_S:.0f} s ({last_error}); log tail:\n"
        f"{_tail(log_path)}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


def _tail(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:]
    except OSError as exc:
        return f"(log unreadable: {exc})"
