"""`dermfusion serve` as a real process for integration tests (so it can be SIGKILLed)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from tests.conftest import dermfusion_command

T = TypeVar("T")


def eventually(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """``probe()`` once it is truthy, polled every 0.3 s; an AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class DermfusionProcess:
    workdir: Path
    port: int
    config: Path
    ae_title: str = "DERMFUSION"
    # a command the service runs under, e.g. `unshare -m` with a small tmpfs as its storage
    wrapper: Sequence[str] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    starts: int = field(default=0, init=False)

    @property
    def log(self) -> Path:
        return self.workdir / "dermfusion.log"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self, timeout: float = 60.0) -> None:
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            self.process = subprocess.Popen(
                [*self.wrapper, *dermfusion_command(), "--config", str(self.config), "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "TCP_NODELAY": "1"},
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dermfusion serve exited:\n{self.log_text()[-3000:]}")
            echo = subprocess.run(
                ["echoscu", "-aec", self.ae_title, "127.0.0.1", str(self.port)],
                capture_output=True,
            )
            if echo.returncode == 0:
                return
            time.sleep(0.3)
        raise RuntimeError(f"dermfusion serve did not answer C-ECHO:\n{self.log_text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)
        self.process = None

    def wait_for_log(self, text: str, count: int = 1, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log_text()
            if log.count(text) >= count:
                return log
            time.sleep(0.2)
        raise AssertionError(
            f"{text!r} not seen {count}x in dermfusion log:\n{self.log_text()[-3000:]}"
        )


def write_config(
    path: Path,
    *,
    port: int,
    storage: Path,
    pacs_port: int | None = None,
    fhir_url: str | None = None,
    stable_seconds: float = 1.0,
    secondary_capture: bool = False,
    outbox_max_attempts: int = 10,
    bind_address: str = "127.0.0.1",
    listener: Sequence[str] = (),
    min_free_mb: int = 0,
    retention: Sequence[str] = (),
    http_port: int | None = None,
    extra: Sequence[str] = (),
) -> Path:
    """A site file for one test run; ``listener`` and ``retention`` lines are added to their
    sections as is, ``extra`` lines (raw TOML, e.g. a whole section) at the end. No free-space
    watermark unless asked for (test machines vary)."""
    lines = [
        "[listener]",
        f"port = {port}",
        f'bind_address = "{bind_address}"',
        *listener,
        "[study]",
        f"stable_seconds = {stable_seconds}",
        "[outbox]",
        "retry_initial_seconds = 0.5",
        "retry_max_seconds = 2",
        f"max_attempts = {outbox_max_attempts}",
        "[demographics]",
        "fhir_wait_seconds = 5",
        "[storage]",
        f'dir = "{storage}"',
        f"min_free_mb = {min_free_mb}",
        "[retention]",
        *retention,
        "[saliency]",
        f"secondary_capture = {'true' if secondary_capture else 'false'}",
    ]
    if pacs_port is not None:
        lines += ["[pacs]", 'ae_title = "ORTHANC"', 'host = "127.0.0.1"', f"port = {pacs_port}"]
    if http_port is not None:
        lines += ["[http]", f"port = {http_port}"]
    if fhir_url is not None:
        lines += [
            "[fhir]",
            f'base_url = "{fhir_url}"',
            'patient_identifier_system = "urn:dermfusion:patient-id"',
        ]
    lines += extra
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def running_dermfusion(
    workdir: Path, port: int | None = None, wrapper: Sequence[str] = (), **config: object
) -> Iterator[DermfusionProcess]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config_path = write_config(
        workdir / "dermfusion.toml", port=port, storage=workdir / "var", **config
    )  # type: ignore[arg-type]
    service = DermfusionProcess(workdir, port, config_path, wrapper=wrapper)
    service.start()
    try:
        yield service
    finally:
        service.kill(signal.SIGTERM)
