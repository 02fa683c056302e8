"""Benchmark: torch threads on a shared CPU machine, with the other cores idle or busy.

The recorded fine-tuning run of ``recording_overhead.py`` (the demo's: shipped base model, count b
with C_Tr = 1, batch 96, a Recorder storing every ``blocks.*.hook_resid_post`` on a 256-sequence
probe batch every 10 steps), timed with each of ``--threads`` torch threads, first with nothing of
ours running beside it ("idle": other users' processes still run; the load average is reported),
then beside ``--burners`` busy-looping processes that keep cores busy ("loaded"). The conditions
alternate within each repeat, so drifts in the machine's load hit all of them alike; medians are
reported, and the ratios to compare.

    python benchmarks/threads.py [--steps 60] [--repeats 2] [--threads 1 2] [--burners 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from recording_overhead import one_run  # the same run, from the sibling benchmark


def busy_processes(n: int) -> list[subprocess.Popen]:
    """``n`` processes that each keep one core busy until killed."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--burners", type=int, default=1, help="busy processes in the loaded condition")
    parser.add_argument("--backend", default=None, choices=["hooked", "bridge"])
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # killed: still stop the busy processes
    out = Path(tempfile.mkdtemp(prefix="capwrap-bench-"))
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {}
    try:
        one_run(10, True, "cpu", args.backend, 999, out)  # warm-up (imports, allocator)
        for r in range(args.repeats):
            for loaded in (False, True):
                burners = busy_processes(args.burners) if loaded else []
                try:
                    time.sleep(1.0 if loaded else 0.0)
                    for threads in args.threads:
                        torch.set_num_threads(threads)
                        key = f"{'loaded' if loaded else 'idle'}, {threads} thread{'s' * (threads > 1)}"
                        times.setdefault(key, []).append(one_run(args.steps, True, "cpu", args.backend, r, out))
                        print(f"repeat {r}, {key}: {times[key][-1]:.1f} s", file=sys.stderr, flush=True)
                        shutil.rmtree(out / f"run{r}", ignore_errors=True)
                finally:
                    for p in burners:
                        p.kill()
                        p.wait()
        median = {k: round(statistics.median(v), 2) for k, v in times.items()}
        low, high = min(args.threads), max(args.threads)
        name = lambda cond, t: f"{cond}, {t} thread{'s' * (t > 1)}"  # noqa: E731
        result = {
            "cpu_count": os.cpu_count(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "steps": args.steps,
            "burners": args.burners,
            "seconds": median,
            f"{high}_over_{low}_threads": {
                cond: round(median[name(cond, high)] / median[name(cond, low)], 2) for cond in ("idle", "loaded")
            },
            "loaded_over_idle": {
                str(t): round(median[name("loaded", t)] / median[name("idle", t)], 2) for t in args.threads
            },
            "runs": {k: [round(t, 2) for t in v] for k, v in times.items()},
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
