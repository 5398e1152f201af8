"""Fuzzing at full count: thousands of mutated instances through a real association.

The CI test (tests/integration/test_fuzz.py) sends 200; this sends as many as asked, against
`dermfusion serve` on embedded defaults, and prints what came back and how each accepted
instance ended, with the time from the last C-STORE until every one had ended and the
service's resident memory before and after.

    .venv/bin/python benchmarks/fuzz_listener.py --cases 2000 [--json out.json]

Run it inside `unshare -n` like the tests, or on a machine where port binding is allowed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.dermfusion_process import running_dermfusion  # noqa: E402
from tests.integration.test_fuzz import (  # noqa: E402
    outcomes,
    resident_mib,
    send_cases,
    unfinished,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as folder,
        running_dermfusion(Path(folder) / "svc", stable_seconds=0.2) as service,
    ):
        before = resident_mib(service)
        started = time.monotonic()
        statuses, unsent = send_cases(service, args.cases, args.seed)
        sent = time.monotonic()
        while unfinished(service.workdir / "var"):
            time.sleep(1)
        ended = time.monotonic()
        result = {
            "cases": args.cases,
            "not_sendable": unsent,
            "statuses": {f"0x{s:04X}": n for s, n in sorted(statuses.items())},
            "outcomes": outcomes(service.workdir / "var"),
            "send_seconds": round(sent - started, 1),
            "seconds_until_all_ended": round(ended - sent, 1),
            "rss_mib_before": round(before),
            "rss_mib_after": round(resident_mib(service)),
            "alive": service.process is not None and service.process.poll() is None,
            "tracebacks_in_log": service.log_text().count("Traceback"),
        }
    for key, value in result.items():
        print(f"{key:24s} {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
