"""`qednbd check` against `qemu-img check` on the same large images, side by side.

Usage: python bench/check_bench.py [--rounds N] [--dir DIR]

Images (made with qemu-img/qemu-io, so neither tool checks its own writing):
  sparse-1T   1 TiB virtual, 64 KiB clusters, one data cluster under each of its 512 L2 tables
  dense-64G   64 GiB virtual, 64 KiB clusters, 32 L2 tables each with 2,048 data clusters
Each round runs both tools on each image, alternating which goes first; the table
prints the median wall time of each, the ratio qednbd/qemu-img (below 1.0 = we are
faster), and each tool's CPU seconds (user+sys of the child, from the kernel).
Results are not asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
L2_SPAN = 2 << 30  # guest bytes under one L2 table (64 KiB clusters, table_size 4)


def _qemu_io(path: Path, commands: list[str]) -> None:
    for start in range(0, len(commands), 256):  # keep the argument list bounded
        args = ["qemu-io", "-f", "qed"]
        for c in commands[start : start + 256]:
            args += ["-c", c]
        subprocess.run([*args, str(path)], check=True, stdout=subprocess.DEVNULL)


def make_images(directory: Path) -> dict[str, Path]:
    images = {}
    sparse = directory / "sparse-1T.qed"
    if not sparse.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qed", str(sparse), "1T"], check=True)
        _qemu_io(sparse, [f"write -P 1 {i * L2_SPAN} 64k" for i in range(512)])
    images["sparse-1T"] = sparse
    dense = directory / "dense-64G.qed"
    if not dense.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qed", str(dense), "64G"], check=True)
        # 2,048 separate 64 KiB writes per table, every other cluster: fragmented, many entries
        _qemu_io(
            dense, [f"write -P 2 {t * L2_SPAN + i * (128 << 10)} 64k" for t in range(32) for i in range(2048)]
        )
    images["dense-64G"] = dense
    return images


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, child CPU seconds, exit status."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "qednbd-check-bench")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    images = make_images(args.dir)
    env_python = [sys.executable, "-m", "qednbd"]
    os.environ["PYTHONPATH"] = str(REPO)
    tools = {
        "qemu-img": lambda p: ["qemu-img", "check", "-f", "qed", str(p)],
        "qednbd": lambda p: [*env_python, "check", str(p)],
    }
    print(f"{'image':<12}{'qemu-img s':>12}{'qednbd s':>12}{'ratio':>8}{'qemu cpu':>10}{'ours cpu':>10}")
    for name, path in images.items():
        samples: dict[str, list[tuple[float, float]]] = {t: [] for t in tools}
        for r in range(args.rounds):
            order = list(tools) if r % 2 == 0 else list(reversed(tools))
            for tool in order:
                wall, cpu, rc = timed(tools[tool](path))
                if rc not in (0, 3):
                    print(f"{tool} check of {name} exited {rc}", file=sys.stderr)
                    return 1
                samples[tool].append((wall, cpu))
        q_wall = statistics.median(w for w, _ in samples["qemu-img"])
        o_wall = statistics.median(w for w, _ in samples["qednbd"])
        q_cpu = statistics.median(c for _, c in samples["qemu-img"])
        o_cpu = statistics.median(c for _, c in samples["qednbd"])
        print(f"{name:<12}{q_wall:>12.3f}{o_wall:>12.3f}{o_wall / q_wall:>8.2f}{q_cpu:>10.3f}{o_cpu:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
