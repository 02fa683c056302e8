"""The contract every analyzer keeps (capwrap.analyzers.checks.check_analyzer), on every kind of pair
capwrap loads: a trained gpt2-style PCFG pair and a compiled Tracr pair."""

from __future__ import annotations

import pytest
import torch
from small_analyzers import ANALYZERS

from capwrap.analyzers import ModelPair
from capwrap.analyzers.checks import check_analyzer
from capwrap.models import ModelSpec, build_model
from capwrap.tasks import PCFGConfig, PCFGTask
from capwrap.tasks.spec import task_from_spec
from capwrap.training import TrainConfig, train


@pytest.fixture(scope="module")
def pcfg_pair():
    config = PCFGConfig(length=10, window=5, occurrence=2)
    capability = PCFGTask("count", "a", config=config)
    downstream = PCFGTask("count", "b", correlation=1.0, config=config)
    spec = ModelSpec(d_vocab=capability.d_vocab, n_ctx=capability.seq_len, n_layers=2, d_model=32, n_heads=4)
    base = build_model(spec, seed=0)
    train(base, PCFGTask(("count", "index"), prior=(0.9, 0.1, 0.0), config=config),
          TrainConfig(steps=80, batch_size=64, lr=3e-3, progress=False))  # fmt: skip
    tuned = base.clone()
    train(tuned, downstream, TrainConfig(steps=20, batch_size=64, lr=3e-3, seed=1, progress=False))
    return ModelPair(base, tuned), capability, downstream


@pytest.fixture(scope="module")
def tracr_pair():
    from capwrap.validation.bases import load_base

    base = load_base("tracr-counter")
    tuned = base.clone()
    with torch.no_grad():  # a small perturbation of the compiled weights, as the paper's noise
        gen = torch.Generator().manual_seed(0)
        for w in tuned.weights().values():
            w.add_(torch.randn(w.shape, generator=gen) * 0.05)
    capability = task_from_spec("tracr=counter,operand=a", model=base)
    downstream = task_from_spec("tracr=counter,operand=b,correlation=1", model=base)
    return ModelPair(base, tuned), capability, downstream


@pytest.mark.parametrize("name", sorted(ANALYZERS))
@pytest.mark.parametrize("pair_kind", ["pcfg", "tracr"])
def test_every_analyzer_keeps_the_contract(name, pair_kind, request):
    pair, capability, downstream = request.getfixturevalue(f"{pair_kind}_pair")
    ev = check_analyzer(ANALYZERS[name](), pair, capability, downstream, eval_size=64)
    assert ev.analyzer == name


@pytest.mark.parametrize("pair_kind", ["pcfg", "tracr"])
def test_probing_through_the_base_embeddings_keeps_the_contract(pair_kind, request):
    """Learned position embeddings (both pairs) are taken from the base as well as token embeddings."""
    from capwrap.analyzers import Probing

    pair, capability, downstream = request.getfixturevalue(f"{pair_kind}_pair")
    ev = check_analyzer(Probing(n=200, steps=50, embeddings="base"), pair, capability, downstream, eval_size=64)
    assert ev.statistic == "probe_kept_share" and ("through the base's embeddings" in ev.summary or not ev.applicable)


def _flawed_analyzer(measures: str, value, plot=None):
    """An analyzer (a real subclass) whose evidence is ``value()`` with the figure ``plot``."""
    from dataclasses import dataclass
    from typing import ClassVar

    import numpy as np
    import pandas as pd

    from capwrap.analyzers import Analyzer, Evidence

    @dataclass
    class Flawed(Analyzer):
        name: str = "flawed"
        kind: ClassVar[str] = "functional"
        statistic: ClassVar[str] = measures

        def analyze(self, context):
            v = value()
            return Evidence(self.name, {"x": v}, pd.DataFrame({"x": [v]}), value=v, replicates=np.full(10, v),
                            summary="a number", plot=plot)  # fmt: skip

    return Flawed()


def test_the_contract_catches_a_broken_analyzer(pcfg_pair):
    import numpy as np

    careless = _flawed_analyzer("careless_noise", lambda: float(np.random.default_rng().random()))  # not reproducible
    pair, capability, downstream = pcfg_pair
    with pytest.raises(AssertionError, match="not reproducible"):
        check_analyzer(careless, pair, capability, downstream, eval_size=16)


def test_the_contract_catches_evidence_that_does_not_survive_a_file(pcfg_pair):
    """A figure made by a lambda cannot be named in an evidence file: a resumed diagnosis would lose it."""
    unnamed = _flawed_analyzer("unnamed_constant", lambda: 0.5, plot=lambda ev: "a figure")
    pair, capability, downstream = pcfg_pair
    with pytest.raises(AssertionError, match="does not survive a file: its plot"):
        check_analyzer(unnamed, pair, capability, downstream, eval_size=16)
