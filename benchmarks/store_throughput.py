"""Benchmark: how fast a RunStore commits a recorder's stream, and what its durability costs.

A :class:`~capwrap.recording.Recorder` at the demo's settings appends the loss, learning rate and
gradient norm every step and, every 10 steps, a record: each ``blocks.*.hook_resid_post`` on the
256-sequence probe batch (4 blocks x 256 x 41 positions x d_model 128 in float32: 21.5 MB) and 14
per-component norm arrays. Every append writes its arrays, ``fdatasync``s each file, then the commit
line (synced too), so a step is durable once ``append`` returns. This script appends that stream to
a store in ``--dir`` (a temporary folder there) and reports the time per record, per plain step,
and for the whole stream — once as the store does it, once with the syncs skipped (what durability
costs on this disk; the store itself has no such switch). A GPU trains a step of the demo in
~12 ms, so a store that commits fewer than ~80 steps a second, records included, holds training
back however well the writes overlap it.

    python benchmarks/store_throughput.py [--steps 200] [--every 10] [--dtype float16] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

import capwrap.recording.store as store_module
from capwrap.recording import RunStore


@contextmanager
def syncs_skipped() -> Iterator[None]:
    """Skip the store's fdatasync calls (for measuring their cost only)."""
    sync = store_module._sync
    store_module._sync = lambda fd: None
    try:
        yield
    finally:
        store_module._sync = sync


def recorder_arrays(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A record's activations (one per block) and per-component norm arrays, seeded."""
    rng = np.random.default_rng(0)
    dtype = np.float16 if args.dtype == "float16" else np.float32
    acts = {
        f"blocks.{i}.hook_resid_post": rng.standard_normal((args.probe, args.positions, args.d_model)).astype(dtype)
        for i in range(args.blocks)
    }
    norms = {f"{what}.{kind}": rng.random(args.components).astype(np.float32)
             for what in ("weight_delta", "grad_norm") for kind in range(7)}  # fmt: skip
    return acts, norms


def stream(folder: Path, acts: dict[str, np.ndarray], norms: dict[str, np.ndarray], args: argparse.Namespace) -> dict:
    """Append the recorder-shaped stream; the times per record and per plain step."""
    arrays = {name: (a.shape, args.dtype) for name, a in acts.items()} | {
        name: (a.shape, "float32") for name, a in norms.items()
    }
    records, plain = [], []
    start = time.perf_counter()
    with RunStore.create(folder, meta={}, arrays=arrays) as store:
        for step in range(args.steps + 1):
            t = time.perf_counter()
            if step % args.every == 0:
                store.append(step, scalars={"loss": 1.0, "weight_delta": 0.1}, arrays=acts | norms)
                records.append(time.perf_counter() - t)
            else:
                store.append(step, scalars={"loss": 1.0, "lr": 1e-4, "grad_norm": 2.0})
                plain.append(time.perf_counter() - t)
    total = time.perf_counter() - start
    megabytes = sum(a.nbytes for a in acts.values()) / 1e6
    return {
        "record_seconds": round(statistics.median(records), 4),
        "plain_step_seconds": round(statistics.median(plain), 5),
        "stream_seconds": round(total, 3),
        "steps_per_second": round((args.steps + 1) / total, 1),
        "record_megabytes_per_second": round(megabytes / statistics.median(records), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10, help="a record every this many steps")
    parser.add_argument("--probe", type=int, default=256, help="probe sequences")
    parser.add_argument("--positions", type=int, default=41)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--blocks", type=int, default=4, help="recorded hooks (one per block)")
    parser.add_argument("--components", type=int, default=20, help="entries of each norm array")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--dir", default=None, help="where the store is written (default: the system's temp folder)")
    args = parser.parse_args()
    if args.steps < args.every or args.every < 1:
        parser.error("--steps must be at least --every, and --every at least 1")
    root = Path(tempfile.mkdtemp(prefix="capwrap-store-", dir=args.dir))
    try:
        acts, norms = recorder_arrays(args)
        durable = stream(root / "durable", acts, norms, args)
        with syncs_skipped():
            unsynced = stream(root / "unsynced", acts, norms, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    record_mb = sum(a.nbytes for a in acts.values()) / 1e6
    print(json.dumps({
        "folder": str(Path(args.dir or tempfile.gettempdir()).resolve()),
        "steps": args.steps, "every": args.every, "dtype": args.dtype, "record_megabytes": round(record_mb, 1),
        "as_the_store_commits": durable, "without_fdatasync": unsynced,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
