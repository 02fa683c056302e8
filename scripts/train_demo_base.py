"""Make the base checkpoint that `capwrap demo` ships with (capwrap/assets/demo_base).

Pretrains the demo model (4 blocks, 4 heads, d_model 128) on the paper's PCFG tasks (counting and
index-of-occurrence, operand prior "low" = (0.999, 0.001, 0)) for 3000 steps of AdamW at lr 1e-3.
About 17 minutes on a 2-core CPU.

    python scripts/train_demo_base.py [--out capwrap/assets/demo_base] [--backend bridge]
"""

from __future__ import annotations

import argparse
import time

import torch

from capwrap.demo import DEMO_BASE, demo_tasks, pretrain_demo_base
from capwrap.models import save_model
from capwrap.tasks import accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEMO_BASE))
    parser.add_argument("--backend", default=None, choices=["hooked", "bridge"])
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
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


if __name__ == "__main__":
    main()
