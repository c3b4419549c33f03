"""Time a new worker's venv from a warm uv cache (target: 2 s or less) and the no-op hot path.

    python benchmarks/bench_venv.py [-n 3] [--dep SPEC]...

One untimed build warms the uv cache, then N fresh data folders are built and timed, with the
time spent in each stage (from the progress callback). The no-op is ``ensure_environment`` on a
folder whose venv is already right: what every supervised start pays.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from supervisor.environment import ensure_environment  # noqa: E402


def parse_dep(spec: str) -> tuple[str, dict]:
    for op in ("==", ">=", "<=", "~=", "!=", ">", "<"):
        if op in spec:
            name, _, ver = spec.partition(op)
            return name, {"package": name, "version": op + ver}
    return spec, {"package": spec, "version": None}


def build(base: Path, deps: dict) -> tuple[float, dict[str, float]]:
    marks: list[tuple[str, float]] = []
    t0 = time.perf_counter()
    ensure_environment(base, deps, progress=lambda m, f: marks.append((m, time.perf_counter())))
    total = time.perf_counter() - t0
    # time of each stage = from its progress call to the next one
    stages = {}
    for (name, t), (_, t_next) in zip(marks, marks[1:]):
        stages[name.split(" ")[0]] = t_next - t
    return total, stages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=3, help="timed builds (default 3)")
    ap.add_argument("--dep", action="append", default=[], help="extra package dependency, e.g. numpy or numpy==2.1")
    args = ap.parse_args()
    deps = dict(parse_dep(d) for d in args.dep)

    with tempfile.TemporaryDirectory(prefix="fn-bench-venv-") as tmp:
        root = Path(tmp)
        warm, _ = build(root / "warm", deps)
        print(f"warm-up build (fills the uv cache if needed): {warm:.3f} s")

        totals, per_stage = [], []
        for i in range(args.n):
            total, stages = build(root / f"w{i}", deps)
            totals.append(total)
            per_stage.append(stages)
            detail = ", ".join(f"{k} {v:.3f}" for k, v in stages.items())
            print(f"  build {i + 1}: {total:.3f} s  ({detail})")
        med = statistics.median(totals)
        print(f"new worker venv, warm cache: median {med:.3f} s, min {min(totals):.3f} s (n={args.n}, target <= 2 s)")

        noop = []
        for _ in range(50):
            t0 = time.perf_counter()
            ensure_environment(root / "w0", deps)
            noop.append(time.perf_counter() - t0)
        print(f"no-op ensure_environment: median {statistics.median(noop) * 1e3:.2f} ms, max {max(noop) * 1e3:.2f} ms")
    return 0 if med <= 2.0 else 1


if __name__ == "__main__":
    sys.exit(main())
