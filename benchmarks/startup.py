"""Start-up cost of the ``dermfusion`` command, measured from outside (a fresh process per run).

Times, as the median of N runs, each command below in a new interpreter, and prints a Markdown
table with each median as a ratio to ``python -c pass`` measured in the same run (this machine
is shared and noisy: compare ratios across runs, not absolute seconds). ``import torch`` is the
reference for what one heavy import costs. The CLI runs as ``python -m plugin`` (what the
``dermfusion`` script runs) from the repository root. ``status`` reads an empty state database
in a temporary folder; ``predict`` scores one sample image with a CSV holding only
``image_name``; ``infer`` scores the one DICOM sample (no PACS, no FHIR server: files).

    .venv/bin/python benchmarks/startup.py [--runs N] [--out var/benchmarks/startup.json]

Writes the same numbers as JSON (default ``var/benchmarks/startup.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
DEFAULT_OUT = REPO / "var" / "benchmarks" / "startup.json"
# exit statuses a command may end with and still count (status: 1 when the disk is nearly full)
ACCEPTED = {"dermfusion status": {0, 1}}


def _commands(work: Path) -> list[tuple[str, list[str]]]:
    python = sys.executable
    cli = [python, "-m", "plugin"]
    sample = sorted(DATA.glob("ISIC_*.jpg"))[0]
    images = work / "images"
    images.mkdir()
    shutil.copy(sample, images / sample.name)
    metadata = work / "metadata.csv"
    metadata.write_text(f"image_name\n{sample.stem}\n")
    config = work / "dermfusion.toml"
    config.write_text(f'[storage]\ndir = "{work / "var"}"\n')
    # an empty state database, as the service leaves it before its first study
    subprocess.run(
        [
            python,
            "-c",
            "import sys; from plugin.config import load_settings; "
            "from plugin.state import SqliteStateStore; "
            "SqliteStateStore(load_settings(sys.argv[1]).storage.state_database).close()",
            str(config),
        ],
        cwd=REPO,
        check=True,
    )
    return [
        ("python -c pass", [python, "-c", "pass"]),
        ("python -c 'import torch'", [python, "-c", "import torch"]),
        ("dermfusion --help", [*cli, "--help"]),
        ("dermfusion status --help", [*cli, "status", "--help"]),
        ("dermfusion status", [*cli, "status", "--config", str(config)]),
        (
            "dermfusion predict (1 image)",
            [
                *cli,
                "predict",
                "--images",
                str(images),
                "--metadata",
                str(metadata),
                "--out",
                str(work / "predicted.csv"),
                "--config",
                str(config),
            ],
        ),
        (
            "dermfusion infer (1 file)",
            [
                *cli,
                "infer",
                str(DATA / "dms_jpeg_baseline.dcm"),
                "--out",
                str(work / "infer"),
                "--config",
                str(config),
            ],
        ),
    ]


def _time(name: str, command: list[str], failures: dict[str, int]) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, check=False,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    if done.returncode not in ACCEPTED.get(name, {0}):
        # kept in the table with its exit status (a command that fails part-way is not timed
        # for what it should do), and its error shown once
        if name not in failures:
            tail = done.stderr.decode(errors="replace")[-2000:]
            print(f"{name}: exit status {done.returncode}\n{tail}", file=sys.stderr)
        failures[name] = done.returncode
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per command (median); default 5")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    parser.add_argument("--label", default="", help="free text stored in the JSON (e.g. before)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    with tempfile.TemporaryDirectory(prefix="dermfusion-startup-") as tmp:
        commands = _commands(Path(tmp))
        samples: dict[str, list[float]] = {name: [] for name, _ in commands}
        failures: dict[str, int] = {}
        # one warm-up of each (page cache, .pyc), then rounds interleaved so that a burst of
        # load on this shared machine hits every command alike
        for name, command in commands:
            _time(name, command, failures)
        for _ in range(args.runs):
            for name, command in commands:
                samples[name].append(_time(name, command, failures))
    medians = {name: statistics.median(runs) for name, runs in samples.items()}
    baseline = medians["python -c pass"]
    rows = [
        {
            "name": name,
            "command": [Path(a).name if a == sys.executable else a for a in command],
            "median_s": round(medians[name], 4),
            "ratio_to_baseline": round(medians[name] / baseline, 2),
            "runs_s": [round(s, 4) for s in samples[name]],
            "failed_exit_status": failures.get(name),
        }
        for name, command in commands
    ]
    print(f"python {platform.python_version()}, {args.runs} runs each, median wall time\n")
    print("| command | median (s) | × `python -c pass` |")
    print("| --- | ---: | ---: |")
    for row in rows:
        name = row["name"]
        failed = f" (failed: exit {row['failed_exit_status']})" if name in failures else ""
        print(
            f"| `{row['name']}`{failed} | {row['median_s']:.3f} | {row['ratio_to_baseline']:.1f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "label": args.label,
        "python": platform.python_version(),
        "runs": args.runs,
        "baseline_s": round(baseline, 4),
        "results": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
