"""How long the data fingerprint (``bench.identity.fingerprint``) takes for a large image folder.

    python benchmarks/data_fingerprint.py [--files 100000] [--synthetic 1000000]

Two measurements, both printed with the machine's words:
* a real folder of ``--files`` empty ``.png`` files in 100 class sub-folders (in a temporary
  folder): the loader's file listing (``bench.data._images_in``: a recursive walk) plus the
  fingerprint (one ``stat`` per file, hashing), which is what every job start pays;
* the hashing alone over a synthetic listing of ``--synthetic`` (name, size, mtime) entries, no
  disk: the part that does not depend on the filesystem.
A network filesystem's ``stat`` is slower than a local disk's: measure there with ``--dir``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import tempfile
import time
from pathlib import Path


def real_folder(n: int, root: Path) -> tuple[float, float]:
    from bench.data import _images_in
    from bench.identity import fingerprint

    for c in range(100):
        (root / f"class{c:03d}").mkdir()
    for i in range(n):
        (root / f"class{i % 100:03d}" / f"{i:08d}.png").touch()
    tick = time.perf_counter()
    files = _images_in(root)
    listed = time.perf_counter()
    fingerprint(root, files)
    return listed - tick, time.perf_counter() - listed


def synthetic(n: int) -> float:
    rows = [
        (f"class{i % 1000:04d}/{i:08d}.JPEG", 110_000 + i % 5000, 1_700_000_000_000_000_000 + i)
        for i in range(n)
    ]
    tick = time.perf_counter()
    h = hashlib.sha256()
    for rel, size, mtime in sorted(rows):
        h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    h.hexdigest()
    return time.perf_counter() - tick


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--synthetic", type=int, default=1_000_000)
    p.add_argument("--dir", default=None, help="where to create the real folder (default: /tmp)")
    a = p.parse_args()
    print(f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        listing, fp = real_folder(a.files, Path(d))
        scale = 1_000_000 / a.files
        print(
            f"real folder, {a.files} files: listing {listing:.2f} s, fingerprint {fp:.2f} s "
            f"(for 1M files, linearly: listing {listing * scale:.0f} s, fingerprint {fp * scale:.0f} s)"
        )
    s = synthetic(a.synthetic)
    print(f"hashing alone, {a.synthetic} synthetic entries: {s:.2f} s")


if __name__ == "__main__":
    main()
