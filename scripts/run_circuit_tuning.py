"""Run tutorial 05 (circuit-tuning) in its full configuration, and keep the executed notebook.

The full configuration — 300 fine-tuning steps per method on the demo's PCFG setting, 2048-sequence
test sets, exact edge patching on 64 sequences, revival budgets of 1000 steps, 300 steps on
stories260K — takes about an hour on a 2-core CPU. The notebook is the one CI runs in its small
configuration; this script sets ``CAPWRAP_FULL=1`` and executes it. benchmarks/RESULTS.md reports
its figures.

    python scripts/run_circuit_tuning.py --out circuit_tuning_full.ipynb [--device cuda] [--small]
"""

from __future__ import annotations

from pathlib import Path

from run_paper_pcfg import main

NOTEBOOK = Path(__file__).resolve().parents[1] / "tutorials" / "05_circuit_tuning.ipynb"


if __name__ == "__main__":
    main(NOTEBOOK, "circuit_tuning_full.ipynb", __doc__)
