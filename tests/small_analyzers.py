"""Every analyzer with samples and budgets small enough for a test on a tiny model, by name: the
analyzer contract test runs each of them on every kind of pair, and tests/gpu runs them on a GPU."""

from __future__ import annotations

from capwrap.analyzers import (
    AttentionComparison,
    Generalization,
    NewLatentProbing,
    Patching,
    Probing,
    Pruning,
    Revival,
    Subgraph,
    WeightDiff,
)

ANALYZERS = {
    "probing": lambda: Probing(n=200, steps=50),
    "pruning": lambda: Pruning(ks=(0, 1, 3), score_size=64),
    "revival": lambda: Revival(max_steps=10, eval_every=5, check_size=32, control_steps=5, batch_size=16, seeds=2),
    "weight_diff": lambda: WeightDiff(graft_fractions=(0.1,)),
    "attention": lambda: AttentionComparison(n=16),
    "patching": lambda: Patching(n=8),
    "generalization": lambda: Generalization(),
    "new_latent": lambda: NewLatentProbing(n=200, steps=50),
    "subgraph": lambda: Subgraph(n=32, method="eap", top_share=0.1),
}
