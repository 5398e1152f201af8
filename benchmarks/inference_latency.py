"""Per-image scoring latency of the shipped model on this machine's CPU.

Prints milliseconds per image for batch sizes 1 and 8, and the ratio of the full pipeline
(preprocess + network) to the network alone measured in the same run: this machine is noisy,
so compare ratios, not absolute numbers across runs.

    .venv/bin/python benchmarks/inference_latency.py [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from monai_bundle.scripts.transforms import load_rgb, preprocess_rgb
from plugin.domain import Demographics
from plugin.model import FusionModel

REPO = Path(__file__).resolve().parents[1]


def _time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = FusionModel.load(REPO / "monai_bundle")
    sample = next(iter(sorted((REPO / "tests" / "data").rglob("*.jpg"))))
    rgb = load_rgb(sample)
    print(f"image {sample.name} {rgb.shape}, torch threads {torch.get_num_threads()}")
    for batch in (1, 8):
        images = [rgb] * batch
        demos = [Demographics.unknown()] * batch
        tensor = torch.stack([preprocess_rgb(rgb)] * batch).contiguous(
            memory_format=torch.channels_last
        )
        meta = torch.from_numpy(np.zeros((batch, 12), np.float32))
        with torch.inference_mode():
            network_only = _time(lambda t=tensor, m=meta: model.network(t, m), args.repeats)
        full = _time(lambda i=images, d=demos: model.score(i, d), args.repeats)
        print(
            f"batch {batch}: {1000 * full / batch:.1f} ms/image scored "
            f"({1000 * network_only / batch:.1f} ms/image network alone, "
            f"ratio {full / network_only:.2f})"
        )


if __name__ == "__main__":
    main()
