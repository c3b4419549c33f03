"""Run the worker fuzzer (tests/test_worker_fuzz.py) for as long as asked; print what it found.

    python benchmarks/fuzz_worker.py --minutes 30            # rounds with fresh seeds until then
    python benchmarks/fuzz_worker.py --minutes 5 --scale 20  # 20x the CI examples per round

Each round is one pytest run of the fuzz module (one worker, a new Hypothesis seed, the
examples scaled by --scale). Failures are shrunk by Hypothesis; their falsifying examples and
errors are printed at the end, with the seed that reproduces them:
    FN_FUZZ_EXAMPLES=<scale> pytest tests/test_worker_fuzz.py --hypothesis-seed=<seed>
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="stop starting rounds after this long")
    ap.add_argument("--scale", type=float, default=10.0, help="examples per round, as a multiple of CI's")
    ap.add_argument("--seed", type=int, default=None, help="first seed (then +1 per round)")
    args = ap.parse_args()

    env = dict(os.environ, FN_FUZZ_EXAMPLES=str(args.scale), FN_FUZZ_STATS="1")
    env.setdefault("UV_PYTHON_DOWNLOADS", "never")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    end = time.monotonic() + args.minutes * 60
    rounds, steps, found = 0, 0, []
    t0 = time.monotonic()
    while time.monotonic() < end:
        rounds += 1
        cmd = [sys.executable, "-m", "pytest", "tests/test_worker_fuzz.py", "-q", "-s", "-n0", "-p", "no:cacheprovider",  # -n0: its stats line
               f"--hypothesis-seed={seed}", "--timeout=3600"]
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        out = r.stdout + r.stderr
        m = re.search(r"fuzz: (\d+) steps", out)
        n = int(m.group(1)) if m else 0
        steps += n
        status = "ok" if r.returncode == 0 else "FOUND"
        print(f"round {rounds}: seed {seed}, {n} steps, {status} ({time.monotonic() - t0:.0f} s)", flush=True)
        if r.returncode != 0:
            keep = ("Error:", "Draw ", "Falsifying", "FAILED", "reproduce_failure", "assert ")
            lines = list(dict.fromkeys(ln.lstrip(" |E") for ln in out.splitlines() if any(k in ln for k in keep)))
            found.append((seed, "\n".join(lines[:60])))
        seed += 1
    print(f"\n{rounds} rounds, {steps} steps in {time.monotonic() - t0:.0f} s; {len(found)} round(s) found something")
    for seed, text in found:
        print(f"\n--- seed {seed} (FN_FUZZ_EXAMPLES={args.scale} pytest tests/test_worker_fuzz.py --hypothesis-seed={seed})")
        print(text)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
