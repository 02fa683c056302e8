"""Make the base checkpoints the validation suite ships with (capwrap/assets/suite).

PCFG bases are pretrained (3000 AdamW steps each, about 5 minutes on 2 CPU cores with the machine
otherwise idle); Tracr bases are compiled with tracr (the `tracr` extra). Every run with the same
seed makes the same weights.

    python scripts/make_suite_bases.py [--only pcfg-a --only tracr-max] [--steps 3000] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from capwrap.models import save_model
from capwrap.validation.bases import BASE_RECIPES, SUITE_ASSETS, make_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only", action="append", choices=sorted(BASE_RECIPES), help="make only this base (repeatable)"
    )
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps (default: the recipe's 3000)")
    parser.add_argument("--out", default=str(SUITE_ASSETS), help="folder of the bases (default: the shipped assets)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.only or sorted(BASE_RECIPES):
        started = time.perf_counter()
        model = make_base(name, steps=args.steps)
        model.metadata["wall_seconds"] = round(time.perf_counter() - started, 1)
        save_model(model, Path(args.out) / name, overwrite=True)
        print(f"{name}: {model.metadata.get('accuracy', 'compiled')} in {model.metadata['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
