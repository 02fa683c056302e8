"""Run tutorial 02 (the paper's PCFG findings) in its full configuration, and keep the executed notebook.

The full configuration — 5 learning rates × 5 correlation levels, 1000 fine-tuning steps each,
4096-sequence test sets, longer revival budgets — is meant for a GPU (about 25 fine-tuning runs;
hours on a 2-core CPU). The notebook is the same one CI runs in its small configuration; this
script only sets ``CAPWRAP_FULL=1`` (and ``CAPWRAP_DEVICE``) and executes it.

    python scripts/run_paper_pcfg.py --out paper_pcfg_full.ipynb [--device cuda] [--small]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "tutorials" / "02_paper_pcfg.ipynb"


def execute_notebook(notebook: Path, out: Path, *, full: bool, device: str | None, timeout: int) -> Path:
    """Execute ``notebook`` with ``CAPWRAP_FULL`` (and ``CAPWRAP_DEVICE``) set; write it to ``out``."""
    os.environ["CAPWRAP_FULL"] = "1" if full else "0"
    if device:
        os.environ["CAPWRAP_DEVICE"] = device
    nb = nbformat.read(notebook, as_version=4)
    with tempfile.TemporaryDirectory() as work:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": work}}).execute()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    nbformat.write(nb, tmp)
    tmp.replace(out)  # never a half-written notebook
    return out


def main(notebook: Path = NOTEBOOK, default_out: str = "paper_pcfg_full.ipynb", doc: str = __doc__) -> None:
    """The command line of a script that runs one tutorial in its full configuration."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", default=default_out, help="where to write the executed notebook")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--small", action="store_true", help="the small (CI) configuration instead")
    parser.add_argument("--timeout", type=int, default=6 * 3600, help="seconds per cell")
    args = parser.parse_args()
    out = execute_notebook(notebook, Path(args.out), full=not args.small, device=args.device, timeout=args.timeout)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
