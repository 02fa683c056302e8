"""Benchmark: wall-time overhead of per-step recording during fine-tuning.

The same fine-tuning run (the demo's: shipped base model, count b with C_Tr = 1, batch 48) with and
without a Recorder that stores every ``blocks.*.hook_resid_post`` on a 256-sequence probe batch
every 10 steps, plus per-component weight-change and gradient norms. ``probe_forwards_percent``
is what the bare forward passes over the probe batch alone cost: the floor for any recorder that
computes those activations. ``--background`` measures due steps in a background thread on a copy
of the weights (``Recorder(background=True)``). Runs alternate
(off, on, off, on, ...) so drifts in machine load hit both alike; the median of each is reported.

    python benchmarks/recording_overhead.py [--steps 200] [--repeats 3] [--threads 1] [--device cpu|cuda] [--backend ...]
        [--background]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch
from timing import timed

from capwrap.demo import DEMO_BASE, FINETUNE_CONFIG, PCFG, demo_tasks
from capwrap.models import load_model
from capwrap.recording import Recorder, RunStore
from capwrap.tasks import PCFGTask
from capwrap.training import train


def one_run(
    steps: int, record: bool, device: str, backend: str | None, seed: int, out: Path, background: bool = False
) -> float:
    model = load_model(str(DEMO_BASE), backend=backend, device=device)
    task = PCFGTask("count", "b", correlation=1.0, config=PCFG)
    cfg = dataclasses.replace(FINETUNE_CONFIG, steps=steps, progress=False, seed=seed)
    recorder = None
    if record:
        probe = demo_tasks()["capability"].sample(256, seed=0)
        recorder = Recorder(model, out / f"run{seed}", hooks="blocks.*.hook_resid_post", probe=probe, every=10,
                            background=background)
    _, elapsed = timed(lambda: train(model, task, cfg, recorder=recorder))
    if record:
        store = RunStore.open(out / f"run{seed}")
        assert len(store.array_steps("blocks.0.hook_resid_post")) == steps // 10 + 1
    return elapsed


def probe_forward_seconds(device: str, backend: str | None) -> float:
    """Time of one bare forward pass over the probe batch: the floor of what recording can cost."""
    model = load_model(str(DEMO_BASE), backend=backend, device=device)
    tokens = demo_tasks()["capability"].sample(256, seed=0).tokens.to(device)
    times = []
    with torch.inference_mode():
        for _ in range(6):
            times.append(timed(lambda: model(tokens))[1])
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default=None, choices=["hooked", "bridge"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (pinned: under load two run slower than one)")
    parser.add_argument("--background", action="store_true", help="measure due steps in a background thread")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(tempfile.mkdtemp(prefix="capwrap-bench-"))
    try:
        one_run(10, True, args.device, args.backend, 999, out)  # warm-up (allocator, kernels)
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.repeats):
            for record in (False, True):
                times[record].append(one_run(args.steps, record, args.device, args.backend, r, out, args.background))
        off, on = statistics.median(times[False]), statistics.median(times[True])
        floor = probe_forward_seconds(args.device, args.backend) * (args.steps // 10)
        size = sum(f.stat().st_size for f in (out / "run0").rglob("*") if f.is_file())
        result = {
            "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
            "backend": load_model(str(DEMO_BASE), backend=args.backend).backend,
            "steps": args.steps,
            "threads": args.threads,
            "background": args.background,
            "seconds_without": round(off, 2),
            "seconds_with": round(on, 2),
            "overhead_percent": round(100 * (on - off) / off, 1),
            "probe_forwards_percent": round(100 * floor / off, 1),
            "store_megabytes": round(size / 2**20, 1),
            "runs": {"without": [round(t, 2) for t in times[False]], "with": [round(t, 2) for t in times[True]]},
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
