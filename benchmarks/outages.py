"""The reliability table's long rows at their full counts (the tests run smaller ones):
SIGKILLs at random moments during a 100-study burst, several times; the FHIR server down 60 s;
the PACS and the FHIR server down together 60 s. Real Orthanc, real FHIR server, DCMTK storescu.

Orthanc binds every interface, so run it in a private network namespace:

    unshare -n sh -c 'ip link set lo up && exec .venv/bin/python benchmarks/outages.py'

Prints a Markdown table and writes var/benchmarks/outages.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.dermfusion_process import free_port, running_dermfusion  # noqa: E402
from tests.integration.orthanc_server import in_private_network, running_orthanc  # noqa: E402
from tests.integration.outages import iter_table, peers_down, sigkill_burst  # noqa: E402
from tests.integration.test_outages import RestartableFhir  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=100, help="studies per SIGKILL burst")
    parser.add_argument("--kills", type=int, default=4, help="SIGKILLs per burst")
    parser.add_argument("--bursts", type=int, default=3, help="bursts, each with its own seed")
    parser.add_argument("--outage", type=float, default=60.0, help="seconds a peer is down")
    parser.add_argument("--outage-studies", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "var" / "benchmarks" / "outages.json")
    args = parser.parse_args()
    if not in_private_network():
        print("run inside `unshare -n` (see the module docstring)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        orthanc = stack.enter_context(
            running_orthanc(
                work / "orthanc",
                dicom_port=free_port(),
                http_port=free_port(),
                dermfusion_port=free_port(),
            )
        )
        fhir = RestartableFhir(work / "fhir")
        stack.callback(fhir.stop)
        for burst in range(args.bursts):
            with running_dermfusion(
                work / f"kill-{burst}", pacs_port=orthanc.dicom_port, fhir_url=fhir.base_url
            ) as service:
                outcome = sigkill_burst(
                    service,
                    orthanc,
                    fhir.base_url,
                    work / f"kill-{burst}-studies",
                    studies=args.studies,
                    kills=args.kills,
                    seed=burst,
                    settle_timeout=600,
                )
            rows.append((f"SIGKILL burst {burst + 1} (seed {burst})", outcome))
            print(rows[-1], flush=True)
        for name, pacs in (("FHIR down", False), ("PACS and FHIR down", True)):
            with running_dermfusion(
                work / name.replace(" ", "-"),
                pacs_port=orthanc.dicom_port,
                fhir_url=fhir.base_url,
            ) as service:
                outcome = peers_down(
                    service,
                    orthanc,
                    fhir.base_url,
                    fhir.down,
                    work / f"{name}-studies".replace(" ", "-"),
                    studies=args.outage_studies,
                    outage_seconds=args.outage,
                    pacs=pacs,
                    fhir=True,
                    settle_timeout=600,
                )
            rows.append((f"{name} {args.outage:.0f} s", outcome))
            print(rows[-1], flush=True)
    print("\n".join(iter_table(rows)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps([{"scenario": n, **dataclasses.asdict(o)} for n, o in rows], indent=2) + "\n"
    )
    return 0 if all(o.lost == 0 and o.duplicated == 0 for _, o in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
