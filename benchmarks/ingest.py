"""Ingest rate over one association: the same N one-image dermoscopy studies (made once into a
temp folder from tests/data/ISIC_*.jpg) sent by the same client, DCMTK ``storescu -R -xy`` with
TCP_NODELAY=1, to five Storage SCPs in turn:

- ``dermfusion serve``, embedded defaults, temp storage dir (every acknowledged instance
  fsync'd and in the state database); no scoring competes: a study is ready only once the
  association that brought it is released, after the timed part (``stable_seconds`` 3600 for
  anything else), and the service is killed right after;
- pynetdicom's bare storage SCP: an AE with the same storage contexts whose handler only writes
  the received bytes to a file (no fsync), served from a thread of this process;
- pynetdicom's own ``storescp`` app (``python -m pynetdicom storescp``: it decodes each data set
  and writes it again, no fsync), the reference issue 21 quotes;
- Orthanc (``StableAge`` 3600, so its auto-routing stays idle);
- DCMTK ``storescp +xa`` (no fsync).

The time is storescu's wall clock (process start to exit: association, N C-STOREs, release).
Orthanc binds every interface, so run it in a private network namespace:

    unshare -n sh -c 'ip link set lo up && exec .venv/bin/python benchmarks/ingest.py [--files N]'

With ``--associations A`` the files are split between A storescu processes sending at once
(the time: until the last is done; storescp then forks a process per association), which is
where dermfusion's group commit shows. With ``--repeat R`` the five are measured R times, in
turn (so a burst of load elsewhere on the machine hits them alike), and each one's median is
reported. On a shared machine a flush (what only dermfusion pays) takes from a fraction of a
millisecond to several: repeat, and compare ratios from the same run only.

Prints a Markdown table (inst/s and the ratios to pynetdicom's bare SCP and to its storescp app,
both measured in the same run) and writes var/benchmarks/ingest.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
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
def dcmtk_storescp(folder: Path, port: int, fork: bool) -> Iterator[None]:
    """``fork``: a process per association (storescp otherwise takes them one at a time)."""
    folder.mkdir(parents=True)
    process = subprocess.Popen(
        ["storescp", "+xa", *(["--fork"] if fork else []), "-aet", "STORESCP"]
        + ["-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # it binds at once; echoscu would add an association to its log only
    try:
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextlib.contextmanager
def pynetdicom_storescp(folder: Path, port: int) -> Iterator[None]:
    """pynetdicom's storescp app, as shipped (its default contexts and logging)."""
    folder.mkdir(parents=True)
    process = subprocess.Popen(
        [sys.executable, "-m", "pynetdicom", "storescp", "-aet", "PYSTORESCP"]
        + ["-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(3.0)  # it imports pydicom and pynetdicom before it binds
    try:
        yield
    finally:
        process.terminate()
        process.wait(timeout=10)


def send(called_ae: str, port: int, files: list[Path], associations: int = 1) -> float:
    """Seconds storescu takes to send ``files``: over one association, or split between
    ``associations`` storescu processes at once (until the last one is done); raises on any
    failure."""
    start = time.perf_counter()
    senders = [
        subprocess.Popen(
            ["storescu", "-R", "-xy", "-aet", "BENCH", "-aec", called_ae, "127.0.0.1", str(port)]
            + [str(f) for f in files[n::associations]],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(associations)
    ]
    outcomes = [(sender, sender.communicate(timeout=600)[1]) for sender in senders]
    elapsed = time.perf_counter() - start
    for sender, stderr in outcomes:
        if sender.returncode != 0 or "E: " in stderr or "W: " in stderr:
            raise RuntimeError(f"storescu to {called_ae} failed:\n{stderr[-2000:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=1, help="rounds over the five SCPs")
    parser.add_argument(
        "--associations", type=int, default=1, help="storescu processes sending at once"
    )
    parser.add_argument("--out", type=Path, default=REPO / "var" / "benchmarks" / "ingest.json")
    args = parser.parse_args()
    if not in_private_network():
        print("run inside `unshare -n` (see the module docstring)", file=sys.stderr)
        return 2
    runs: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = [f for _, made in make_studies(work / "files", args.files, "ingest") for f in made]
        size = sum(f.stat().st_size for f in files) / len(files)

        @contextlib.contextmanager
        def dermfusion() -> Iterator[tuple[str, int]]:
            with running_dermfusion(work / "dermfusion", stable_seconds=3600) as service:
                yield service.ae_title, service.port
                # The release made every study ready: scoring has begun (not timed); a
                # graceful stop would wait for the pass in progress.
                service.kill()

        @contextlib.contextmanager
        def bare() -> Iterator[tuple[str, int]]:
            port = free_port()
            with bare_pynetdicom(work / "bare", port):
                yield "BARE", port

        @contextlib.contextmanager
        def pynetdicom_app() -> Iterator[tuple[str, int]]:
            port = free_port()
            with pynetdicom_storescp(work / "pystorescp", port):
                yield "PYSTORESCP", port

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
            with dcmtk_storescp(work / "storescp", port, fork=args.associations > 1):
                yield "STORESCP", port

        targets: dict[str, Callable[[], contextlib.AbstractContextManager[tuple[str, int]]]] = {
            "dermfusion serve (fsync + SQLite, scoring held off)": dermfusion,
            "pynetdicom bare SCP (write only, no fsync)": bare,
            "pynetdicom storescp app (decode + write, no fsync)": pynetdicom_app,
            "Orthanc": orthanc,
            "DCMTK storescp (no fsync)": storescp,
        }
        for round_ in range(args.repeat):
            for name, target in targets.items():
                with target() as (ae_title, port):
                    rate = len(files) / send(ae_title, port, files, args.associations)
                runs.setdefault(name, []).append(rate)
                print(f"round {round_ + 1}: {name}: {rate:.0f} inst/s", flush=True)
                for folder in ("dermfusion", "bare", "pystorescp", "orthanc", "storescp"):
                    shutil.rmtree(work / folder, ignore_errors=True)  # made anew next round
    rates = {name: statistics.median(values) for name, values in runs.items()}
    baseline = rates["pynetdicom bare SCP (write only, no fsync)"]
    app = rates["pynetdicom storescp app (decode + write, no fsync)"]
    what = f"median of {args.repeat} runs" if args.repeat > 1 else "one run"
    over = "one association" if args.associations == 1 else f"{args.associations} at once"
    print(f"\n{len(files)} instances of {size / 1024:.1f} KiB on average, {over}, {what}\n")
    print("| Storage SCP | inst/s | ratio to pynetdicom bare SCP | ratio to its storescp app |")
    print("| --- | --- | --- | --- |")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {rate / baseline:.2f} | {rate / app:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "instances": len(files),
                "associations": args.associations,
                "mean_bytes": size,
                "inst_per_s": rates,
                "runs": runs,
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
