"""How far a suite scenario's fine-tune moved the token embeddings, against its base.

Reads the tuned models a `capwrap validate` run cached (``OUT/cache/tuned/<key>``) and prints, per
scenario, the relative change of the operand tokens' embedding rows (``|ΔW_E[t]| / |W_E[t]|`` for
``a``, ``b``, ``c``), the median row's, and the embedding's share of the whole squared weight change.
Written to explain the SGD index miss (benchmarks/RESULTS.md, issue 9): SGD with momentum at the
"medium" rate rewrites the operand embeddings that AdamW at its medium rate barely moves.

    python benchmarks/suite_embedding_drift.py --cache /tmp/suite/held-out-41/cache \\
        held/index-b/sgd-medium-c1/s41 held/index-b/adamw-medium-c1/s41 held/index-b/adamw-small-c1/s41
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from capwrap.models import load_model
from capwrap.tasks.pcfg import PCFGConfig, PCFGVocab
from capwrap.validation import scenario
from capwrap.validation.bases import load_base


def drift(name: str, cache: Path) -> dict[str, float]:
    """The operand rows' relative change, the median row's, and the embedding's share of the change."""
    s = scenario(name)
    base, tuned = load_base(s.base), load_model(cache / "tuned" / s.key())
    before, after = base.weights(), tuned.weights()
    rows = (after["embed.W_E"] - before["embed.W_E"]).norm(dim=-1) / before["embed.W_E"].norm(dim=-1)
    total = sum(float((after[k] - before[k]).pow(2).sum()) for k in before)
    vocab = PCFGVocab(PCFGConfig())
    out = {f"row {t}": float(rows[vocab[t]]) for t in ("a", "b", "c")}
    out["median row"] = float(rows.median())
    out["embedding share"] = float((after["embed.W_E"] - before["embed.W_E"]).pow(2).sum()) / total
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenarios", nargs="+", help="suite scenario names (PCFG families)")
    parser.add_argument("--cache", type=Path, required=True, help="the validate run's cache folder")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for name in args.scenarios:
        figures = ", ".join(f"{k} {v:.3f}" for k, v in drift(name, args.cache).items())
        print(f"{name}: {figures}")


if __name__ == "__main__":
    main()
