"""Ingest rate over one association: the same N one-image dermoscopy studies (made once into a
temp folder from tests/data/ISIC_*.jpg) sent by the same client, DCMTK ``storescu -R -xy`` with
TCP_NODELAY=1, to four Storage SCPs in turn:

- ``dermfusion serve``, embedded defaults, temp storage dir, ``stable_seconds`` 3600 so no
  scoring competes (every acknowledged instance fsync'd and in the state database);
- pynetdicom's bare storage SCP: an AE with the same storage contexts whose handler only writes
  the received bytes to a file (no fsync), served from a thread of this process;
- Orthanc (``StableAge`` 3600, so its auto-routing stays idle);
- DCMTK ``storescp +xa`` (no fsync).

The time is storescu's wall clock (process start to exit: association, N C-STOREs, release).
Orthanc binds every interface, so run it in a private network namespace:

    unshare -n sh -c 'ip link set lo up && exec .venv/bin/python benchmarks/ingest.py [--files N]'

Prints a Markdown table (inst/s and the ratio to pynetdicom's bare SCP, the baseline measured in
the same run) and writes var/benchmarks/ingest.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.events import Event

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_io.images import SopClass  # noqa: E402
from dicom_io.listener import TRANSFER_SYNTAXES, enable_tcp_nodelay  # noqa: E402
from tests.integration.dermfusion_process import free_port, running_dermfusion  # noqa: E402
from tests.integration.orthanc_server import in_private_network, running_orthanc  # noqa: E402
from tests.integration.outages import make_studies  # noqa: E402

os.environ["TCP_NODELAY"] = "1"  # storescu, storescp and Orthanc read it


@contextlib.contextmanager
def bare_pynetdicom(folder: Path, port: int) -> Iterator[None]:
    """pynetdicom's bare storage SCP: the listener's contexts, the handler only writes the file."""
    folder.mkdir(parents=True)

    def on_store(event: Event) -> int:
        sop = event.request.AffectedSOPInstanceUID
        with open(folder / f"{sop}.dcm", "wb") as stream:
            stream.write(event.encoded_dataset())
        return 0x0000

    ae = AE(ae_title="BARE")
    for sop_class in SopClass:
        ae.add_supported_context(sop_class.value, list(TRANSFER_SYNTAXES))
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, enable_tcp_nodelay)],
    )
    try:
        yield
    finally:
        server.shutdown()


@contextlib.contextmanager
def dcmtk_storescp(folder: Path, port: int) -> Iterator[None]:
    folder.mkdir(parents=True)
    process = subprocess.Popen(
        ["storescp", "+xa", "-aet", "STORESCP", "-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # it binds at once; echoscu would add an association to its log only
    try:
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


def send(called_ae: str, port: int, files: list[Path]) -> float:
    """Seconds storescu takes to send ``files`` over one association; raises on any failure."""
    start = time.perf_counter()
    done = subprocess.run(
        ["storescu", "-R", "-xy", "-aet", "BENCH", "-aec", called_ae, "127.0.0.1", str(port)]
        + [str(f) for f in files],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or "E: " in done.stderr or "W: " in done.stderr:
        raise RuntimeError(f"storescu to {called_ae} failed:\n{done.stderr[-2000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--out", type=Path, default=REPO / "var" / "benchmarks" / "ingest.json")
    args = parser.parse_args()
    if not in_private_network():
        print("run inside `unshare -n` (see the module docstring)", file=sys.stderr)
        return 2
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = [f for _, made in make_studies(work / "files", args.files, "ingest") for f in made]
        size = sum(f.stat().st_size for f in files) / len(files)

        @contextlib.contextmanager
        def dermfusion() -> Iterator[tuple[str, int]]:
            with running_dermfusion(work / "dermfusion", stable_seconds=3600) as service:
                yield service.ae_title, service.port

        @contextlib.contextmanager
        def bare() -> Iterator[tuple[str, int]]:
            port = free_port()
            with bare_pynetdicom(work / "bare", port):
                yield "BARE", port

        @contextlib.contextmanager
        def orthanc() -> Iterator[tuple[str, int]]:
            ports = free_port(), free_port(), free_port()
            with running_orthanc(
                work / "orthanc",
                dicom_port=ports[0],
                http_port=ports[1],
                dermfusion_port=ports[2],
                stable_age=3600,
            ) as server:
                yield server.aet, server.dicom_port

        @contextlib.contextmanager
        def storescp() -> Iterator[tuple[str, int]]:
            port = free_port()
            with dcmtk_storescp(work / "storescp", port):
                yield "STORESCP", port

        targets: dict[str, Callable[[], contextlib.AbstractContextManager[tuple[str, int]]]] = {
            "dermfusion serve (fsync + SQLite, scoring held off)": dermfusion,
            "pynetdicom bare SCP (write only, no fsync)": bare,
            "Orthanc": orthanc,
            "DCMTK storescp (no fsync)": storescp,
        }
        for name, target in targets.items():
            with target() as (ae_title, port):
                rates[name] = len(files) / send(ae_title, port, files)
            print(f"{name}: {rates[name]:.0f} inst/s", flush=True)
    baseline = rates["pynetdicom bare SCP (write only, no fsync)"]
    print(f"\n{len(files)} instances of {size / 1024:.1f} KiB on average, one association each\n")
    print("| Storage SCP | inst/s | ratio to pynetdicom bare SCP |\n| --- | --- | --- |")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {rate / baseline:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "instances": len(files),
                "mean_bytes": size,
                "inst_per_s": rates,
                "baseline": "pynetdicom bare SCP",
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
