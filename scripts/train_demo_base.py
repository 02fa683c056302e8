"""Make the checkpoints that `capwrap demo` ships with: the base model (capwrap/assets/demo_base)
and, with ``--control``, the revival control (capwrap/assets/demo_control).

The base: the demo model (4 blocks, 4 heads, d_model 128) pretrained on the paper's PCFG tasks
(counting and index-of-occurrence, operand prior "low" = (0.999, 0.001, 0)) for 3000 steps of AdamW
at lr 1e-3; about 17 minutes on a 2-core CPU. The control (``--control``, from the shipped base): a
fresh model of the same shape trained 300 steps on count b (``capwrap.demo.make_demo_control``),
then the default demo is run once (seed 0, both scenarios share it) to keep the control's reverse
fine-tuning runs in ``demo_control/revival``; about 8 minutes. ``--control-runs`` keeps the shipped
control and only makes its reverse fine-tuning runs again (after a change to how revival runs or
checks them, which changes their keys): the old runs are replaced; about 2 minutes.

    python scripts/train_demo_base.py [--out capwrap/assets/demo_base] [--backend bridge]
    python scripts/train_demo_base.py --control
    python scripts/train_demo_base.py --control-runs
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from capwrap.demo import DEMO_BASE, DEMO_CONTROL, demo_tasks, make_demo_control, pretrain_demo_base, run_demo
from capwrap.files import copy_missing
from capwrap.models import load_model, save_model
from capwrap.tasks import accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEMO_BASE))
    parser.add_argument("--backend", default=None, choices=["hooked", "bridge"])
    parser.add_argument("--control", action="store_true", help="make the revival control of the shipped base instead")
    parser.add_argument("--control-runs", action="store_true",
                        help="keep the shipped control and make its reverse fine-tuning runs again")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    if args.control:
        make_control(args.backend, started)
        return
    if args.control_runs:
        keep_control_runs(args.backend)
        return
    model = pretrain_demo_base(backend=args.backend)
    tasks = demo_tasks()
    final = {
        k: accuracy(model, tasks[k].sample(2048, seed=123))
        for k in ("capability", "downstream_correlated", "downstream_uncorrelated")
    }
    model.metadata["accuracy"] = final
    model.metadata["wall_seconds"] = round(time.perf_counter() - started, 1)
    save_model(model, args.out, overwrite=True)
    print(f"saved {args.out}: {final}")


def make_control(backend: str | None, started: float) -> None:
    """Train and save the revival control, then keep its reverse fine-tuning runs of the default demo."""
    control = make_demo_control(load_model(str(DEMO_BASE), backend=backend))
    control.metadata = {
        "made_by": "capwrap.demo.make_demo_control",
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    shutil.rmtree(DEMO_CONTROL, ignore_errors=True)
    save_model(control, str(DEMO_CONTROL))
    keep_control_runs(backend)


def keep_control_runs(backend: str | None) -> None:
    """Run the default demo once with no kept runs and keep the control's reverse fine-tuning runs
    in ``demo_control/revival`` (replacing the ones there)."""
    kept = Path(DEMO_CONTROL) / "revival"
    with tempfile.TemporaryDirectory() as tmp:
        shutil.rmtree(kept, ignore_errors=True)  # so the demo makes every run afresh
        result = run_demo(tmp, seed=0, backend=backend, progress=False)
        runs = copy_missing(Path(tmp, "revival_cache"), kept)
    print(f"kept {runs} reverse fine-tuning run(s) of {DEMO_CONTROL}; demo verdict {result.summary['verdict']}")


if __name__ == "__main__":
    main()
