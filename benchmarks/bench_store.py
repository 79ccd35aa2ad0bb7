"""Opening a big project must not load its images.

Builds a project of N cases (default 10,000; small 64x64 images, written in one batch), then
measures, in fresh processes, the time and peak memory of
  * the baseline: starting Python and importing the store module, and
  * opening the project and listing every case's status.
It prints the open cost against the baseline, and how many zarr store reads the open made
(counted by wrapping zarr's LocalStore.get in the probe process).

    .venv/bin/python benchmarks/bench_store.py [--cases 10000] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training_backend.project.store import Project  # noqa: E402

PROBE = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from training_backend.project.store import Project
t1 = time.perf_counter()
import zarr.storage
reads = []
_get = zarr.storage.LocalStore.get
async def counting_get(self, key, *args, **kwargs):
    reads.append(key)
    return await _get(self, key, *args, **kwargs)
zarr.storage.LocalStore.get = counting_get
if {open!r}:
    p = Project.open({path!r})
    statuses = [p.case(c).status for c in p.case_ids()]
    n = len(statuses)
else:
    n = 0
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "open_s": t2 - t1, "n": n, "zarr_reads": len(reads),
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def probe(path: Path, open_it: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(path=str(path), open=open_it)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout)


def build_project(path: Path, cases: int) -> None:
    """A project of ``cases`` small (64x64) images with image labels, unless ``path`` is one."""
    if Project.is_project(path):
        return
    p = Project.create(path, ["lesion"], ["normal", "benign", "malignant"])
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    with p.batch(flush_every_s=30):
        for i in range(cases):
            p.add_case(img, f"case ({i})", image_label=("normal", "benign", "malignant")[i % 3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--keep", help="build the project here and keep it")
    args = ap.parse_args()
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp()) / "big"
    t = time.perf_counter()
    build_project(tmp, args.cases)
    build_s = time.perf_counter() - t
    base = min((probe(tmp, False) for _ in range(3)), key=lambda r: r["import_s"])
    runs = [probe(tmp, True) for _ in range(3)]
    best = min(runs, key=lambda r: r["open_s"])
    index_mb = (tmp / "index.json").stat().st_size / 1e6
    print(f"cases: {best['n']}  (built in {build_s:.1f} s; index.json {index_mb:.1f} MB)")
    print(f"baseline (python + import store): {base['import_s'] * 1000:.0f} ms, "
          f"peak RSS {base['maxrss_mb']:.0f} MB")
    print(f"open + status of every case:      {best['open_s'] * 1000:.0f} ms, "
          f"peak RSS {best['maxrss_mb']:.0f} MB")
    print(f"ratio open/import time: {best['open_s'] / base['import_s']:.2f}x; "
          f"extra memory: {best['maxrss_mb'] - base['maxrss_mb']:.0f} MB "
          f"(images total {best['n'] * 64 * 64 / 1e6:.0f} MB uncompressed)")
    print(f"zarr store reads while opening: {best['zarr_reads']}"
          + (" (no image was loaded)" if best["zarr_reads"] == 0 else ""))


if __name__ == "__main__":
    main()
