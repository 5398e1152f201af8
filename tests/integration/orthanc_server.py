"""Run a real Orthanc (the test PACS) from ``configs/orthanc`` for the duration of a ``with`` block.

Not a fixture itself: tests wrap it. Orthanc listens on all interfaces (it has no bind-address
option) with authentication off, so callers run inside a private network namespace
(``unshare -n sh -c 'ip link set lo up && ...'``); ``in_private_network()`` tells them whether
they are.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs" / "orthanc"
TEMPLATE = CONFIG_DIR / "orthanc.json"
AUTOROUTE_LUA = CONFIG_DIR / "autoroute.lua"
ORTHANC_FALLBACK = Path("/usr/sbin/Orthanc")  # Debian's path; /usr/sbin is not on every PATH

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0  # a clean shutdown takes ~3 s (the HTTP server drains for 2 s)
LOG_TAIL_CHARS = 4000
FORWARDED_MARK = "DermfusionForwarded"  # the user metadata autoroute.lua sets


def orthanc_binary() -> str:
    """Path of the Orthanc server; `make orthanc-install` provides it, so absence is an error."""
    found = shutil.which("Orthanc")
    if found is not None:
        return found
    if ORTHANC_FALLBACK.is_file():
        return str(ORTHANC_FALLBACK)
    raise RuntimeError("Orthanc is not installed: run `make orthanc-install`")


def in_private_network() -> bool:
    """True when loopback is the only interface, i.e. nobody else can reach an open Orthanc."""
    return {name for _, name in socket.if_nameindex()} == {"lo"}


def free_port() -> int:
    """A loopback port nobody listens on right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def strip_json_comments(text: str) -> str:
    """Orthanc's JSON allows // and /* */ comments; json.loads does not ("//" in strings stays)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        char = text[i]
        if char == '"':
            end = i + 1
            while end < n and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            out.append(text[i : end + 1])
            i = end + 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end == -1 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end == -1:
                raise ValueError("unterminated /* comment in Orthanc configuration")
            i = end + 2
        else:
            out.append(char)
            i += 1
    return "".join(out)


def write_config(
    workdir: Path,
    *,
    dicom_port: int,
    http_port: int,
    dermfusion_port: int,
    dermfusion_ae: str,
    stable_age: int,
) -> Path:
    """The template with this run's ports, storage in ``workdir`` and an absolute Lua path."""
    config: dict[str, Any] = json.loads(strip_json_comments(TEMPLATE.read_text(encoding="utf-8")))
    config.update(
        {
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "LuaScripts": [str(AUTOROUTE_LUA)],
            "DicomPort": dicom_port,
            "HttpPort": http_port,
            "StableAge": stable_age,
        }
    )
    config["DicomModalities"]["dermfusion"] = [dermfusion_ae, "127.0.0.1", dermfusion_port]
    path = workdir / "orthanc.json"
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


class OrthancServer:
    """A started Orthanc; ``stop()``/``start()`` restart it on the same storage."""

    def __init__(self, config: Path, *, http_port: int, dicom_port: int, aet: str) -> None:
        self.config = config
        self.http = f"http://127.0.0.1:{http_port}"
        self.dicom_port = dicom_port
        self.aet = aet
        self.log_path = config.parent / "orthanc.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._client = httpx.Client(base_url=self.http, timeout=10.0)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start Orthanc and return once its REST API answers (30 s at most)."""
        if self._process is not None:
            raise RuntimeError("Orthanc is already running")
        env = dict(os.environ, TCP_NODELAY="1")  # else every C-STORE waits ~50 ms (Nagle)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [orthanc_binary(), str(self.config)],
                cwd=self.config.parent,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Shut Orthanc down cleanly (SIGTERM), so a later ``start()`` finds intact storage."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self) -> None:
        """Stop the server and release the HTTP client."""
        self.stop()
        self._client.close()

    def log_tail(self) -> str:
        """The end of Orthanc's log, for error messages."""
        if not self.log_path.exists():
            return "(no log)"
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-LOG_TAIL_CHARS:]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self._process.returncode}:\n{self.log_tail()}"
                )
            try:
                if self._client.get("/system", timeout=1.0).status_code == 200:
                    return
                last_error = "HTTP status != 200"
            except httpx.TransportError as exc:
                last_error = repr(exc)
            time.sleep(0.1)
        raise RuntimeError(
            f"Orthanc not ready after {READY_TIMEOUT_S:.0f} s ({last_error}):\n{self.log_tail()}"
        )

    # -- REST helpers ----------------------------------------------------------------------

    def get_json(self, path: str) -> Any:
        """GET a REST resource; HTTP errors raise."""
        response = self._client.get(path)
        response.raise_for_status()
        return response.json()

    def find(self, query: dict[str, Any]) -> list[Any]:
        """Orthanc's /tools/find (Level, Query, Expand) answer. Asked again once when Orthanc
        closed the kept-alive connection meanwhile (it does after a quiet spell)."""
        try:
            response = self._client.post("/tools/find", json=query)
        except httpx.RemoteProtocolError:
            response = self._client.post("/tools/find", json=query)
        response.raise_for_status()
        return list(response.json())

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """The study's instances as Orthanc describes them (ID, MainDicomTags, ParentSeries...)."""
        query = {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
        response = self._client.post("/tools/find", json=query)
        response.raise_for_status()
        return list(response.json())

    def instance_metadata(self, instance_id: str) -> dict[str, str]:
        """Orthanc's metadata of one instance (SopClassUid, RemoteAET, DermfusionForwarded...)."""
        return dict(self.get_json(f"/instances/{instance_id}/metadata?expand"))

    def sop_classes_in_study(self, study_uid: str) -> list[str]:
        """SOP Class UIDs of the study's instances, sorted (Orthanc 1.10 keeps them as metadata)."""
        return sorted(
            self.instance_metadata(item["ID"])["SopClassUid"]
            for item in self.study_instances(study_uid)
        )

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc's id of the study with this StudyInstanceUID, or None if it has none."""
        response = self._client.post(
            "/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
        )
        response.raise_for_status()
        ids = response.json()
        return str(ids[0]) if ids else None

    def is_stable(self, study_uid: str) -> bool:
        """Whether Orthanc considers the study stable (no new instance for StableAge seconds)."""
        study_id = self.study_id(study_uid)
        return study_id is not None and bool(self.get_json(f"/studies/{study_id}")["IsStable"])


@contextlib.contextmanager
def running_orthanc(
    workdir: Path,
    *,
    dicom_port: int,
    http_port: int,
    dermfusion_port: int,
    dermfusion_ae: str = "DERMFUSION",
    stable_age: int = 1,
) -> Iterator[OrthancServer]:
    """Yield a started Orthanc whose storage, config and log live in ``workdir``."""
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(
        workdir,
        dicom_port=dicom_port,
        http_port=http_port,
        dermfusion_port=dermfusion_port,
        dermfusion_ae=dermfusion_ae,
        stable_age=stable_age,
    )
    aet = str(json.loads(config.read_text(encoding="utf-8"))["DicomAet"])
    server = OrthancServer(config, http_port=http_port, dicom_port=dicom_port, aet=aet)
    try:
        server.start()
        yield server
    finally:
        server.close()
