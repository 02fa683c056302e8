"""Run tutorial 05 (circuit-tuning) in its full configuration, and keep the executed notebook.

The full configuration — 300 fine-tuning steps per method on the demo's PCFG setting, 2048-sequence
test sets, exact edge patching on 64 sequences, revival budgets of 1000 steps, 300 steps on
stories260K — takes about an hour on a 2-core CPU. The notebook is the one CI runs in its small
configuration; this script sets ``CAPWRAP_FULL=1`` and executes it. benchmarks/RESULTS.md reports
its figures.

    python scripts/run_circuit_tuning.py --out circuit_tuning_full.ipynb [--device cuda] [--small]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from run_paper_pcfg import execute_notebook

NOTEBOOK = Path(__file__).resolve().parents[1] / "tutorials" / "05_circuit_tuning.ipynb"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="circuit_tuning_full.ipynb", help="where to write the executed notebook")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--small", action="store_true", help="the small (CI) configuration instead")
    parser.add_argument("--timeout", type=int, default=6 * 3600, help="seconds per cell")
    args = parser.parse_args()
    out = execute_notebook(NOTEBOOK, Path(args.out), full=not args.small, device=args.device, timeout=args.timeout)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
