"""Linear probes: batched fitting, the analyzer on real models and recorded runs."""

from __future__ import annotations

import pytest
import torch

from capwrap.analyzers import ModelPair, NewLatentProbing, Probing, fit_probes
from capwrap.errors import ConfigError
from capwrap.models import ModelSpec, build_model
from capwrap.recording import Recorder, RunStore
from capwrap.tasks import PCFGConfig, PCFGTask
from capwrap.training import TrainConfig, train


def _data(n=300, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    signal = torch.nn.functional.one_hot(labels, d).float() * 2 + 0.5 * torch.randn(n, d, generator=g)
    return labels, signal, torch.randn(n, d, generator=g)


def test_probes_find_planted_signal_and_not_noise():
    labels, signal, noise = _data()
    result = fit_probes(torch.stack([signal, noise]), labels)
    assert result.test_accuracy[0] > 0.95
    assert result.test_accuracy[1] < result.majority_baseline + 0.15
    assert result.n_classes == 4


def test_batched_fit_equals_one_probe_at_a_time():
    labels, signal, noise = _data(seed=1)
    feats = torch.stack([signal, noise, signal + noise])
    batched = fit_probes(feats, labels, seed=3).test_accuracy
    single = torch.cat([fit_probes(feats[i : i + 1], labels, seed=3).test_accuracy for i in range(3)])
    assert torch.allclose(batched, single, atol=0.01)


def test_bad_probe_input():
    labels, signal, _ = _data()
    with pytest.raises(ConfigError, match="single class"):
        fit_probes(signal[None], torch.zeros_like(labels))
    with pytest.raises(ConfigError, match=r"\[probe, n, d\]"):
        fit_probes(signal, labels)
    with pytest.raises(ConfigError, match="empty train or test"):
        fit_probes(signal[None], labels, test_fraction=0.0)


def test_probing_analyzer_on_a_trained_model_and_its_run(backend, tmp_path):
    task = PCFGTask(config=PCFGConfig(length=12, window=6, occurrence=2))
    spec = ModelSpec(d_vocab=task.d_vocab, n_ctx=task.seq_len, n_layers=2, d_model=32, n_heads=4)
    base = build_model(spec, backend=backend, seed=0)
    train(base, task, TrainConfig(steps=150, batch_size=64, lr=3e-3, progress=False))
    tuned = base.clone()
    rec = Recorder(tuned, tmp_path / "run", probe=task.sample(200, seed=5), every=10)
    downstream = PCFGTask("count", "b", config=task.config)
    train(tuned, downstream, TrainConfig(steps=20, batch_size=32, lr=1e-3, progress=False), recorder=rec)

    probing = Probing(label="count_a", n=600, steps=200)
    ev = probing(ModelPair(base, tuned), task, downstream, RunStore.open(tmp_path / "run"), eval_size=128)
    assert set(ev.table["model"]) == {"base", "tuned", "untrained"} and len(ev.table) == 6
    assert 0 <= ev.headline["probe_best_untrained"] <= 1
    assert ev.headline["probe_best_base"] > ev.headline["majority_baseline"] + 0.2
    per_step = ev.details["per_step"]
    assert {r["step"] for r in per_step} == {0, 10, 20} and len(per_step) == 6
    assert ev.direction in ("wrapper", "change", "neutral") and ev.reasons
    with pytest.raises(ConfigError, match="no latent label 'count_z'"):
        Probing(label="count_z", n=50)(ModelPair(base, tuned), task, downstream, eval_size=32)
    # a label with one value on every sequence: nothing to probe, said in the evidence (in a diagnosis
    # it used to stop everything after the analyzers before it had run)
    single = Probing(label="family", n=100, steps=5)(ModelPair(base, tuned), task, downstream, eval_size=32)
    assert not single.applicable and "family takes one value on every sequence" in single.summary


def test_probing_statistic_is_the_kept_share_of_the_margin_over_the_floor(small_spec, small_task):
    """A tuned model whose read-out is scrambled keeps the latent (kept share near 1); a freshly
    initialized model, which never had it, keeps none of the base's margin over the floor (near 0).
    Probed as they are (``embeddings="tuned"``): the fresh model's loss includes its embeddings, and
    on this small task the base's embeddings alone carry nearly the whole count (next test)."""
    base = build_model(small_spec, seed=0)
    train(base, small_task, TrainConfig(steps=150, batch_size=64, lr=3e-3, progress=False))
    hidden = base.clone()
    with torch.no_grad():
        hidden.weights()["unembed.W_U"].copy_(hidden.weights()["unembed.W_U"][:, torch.randperm(small_spec.d_vocab)])
    destroyed = build_model(small_spec, seed=3)
    probing = Probing(label="count_a", n=600, steps=200, embeddings="tuned")
    kept = probing(ModelPair(base, hidden), small_task, small_task, eval_size=128)
    lost = probing(ModelPair(base, destroyed), small_task, small_task, eval_size=128)
    h = kept.headline
    floor = max(h["majority_baseline"], h["probe_best_untrained"])
    assert kept.value == pytest.approx((h["probe_best_tuned"] - floor) / (h["probe_best_base"] - floor))
    assert kept.value > 0.9 > 0.3 > lost.value  # (the floor is another fresh model: lost.value is near 0)
    lo, hi = kept.intervals["value"]
    assert lo <= kept.value <= hi and len(kept.replicates) == 200
    assert kept.direction == "wrapper" and lost.direction == "change"


def test_probing_through_the_base_embeddings_sees_past_a_rewritten_token_lookup(small_spec, small_task):
    """A fine-tune that only rewrote what a token means (here: ``a`` embedded as ``b``) hides the
    latent from probes of the tuned model as it is; read through the base's embeddings, the tuned
    model's layers are the base's, so its probes read exactly what the base's do. The floor's fresh
    model reads the input through the base's embeddings too (on this small task they alone give
    nearly the whole count, so the statistic does not apply: probes cannot tell)."""
    base = build_model(small_spec, seed=0)
    train(base, small_task, TrainConfig(steps=150, batch_size=64, lr=3e-3, progress=False))
    relabeled = base.clone()
    with torch.no_grad():
        w_e, vocab = relabeled.weights()["embed.W_E"], small_task.vocab
        w_e[vocab["a"]] = w_e[vocab["b"]]
    before = {k: v.clone() for k, v in relabeled.weights().items()}
    settings = dict(label="count_a", n=600, steps=200)
    assert Probing().embeddings == "base"  # the default, what the shipped rule is fitted with
    assert NewLatentProbing().embeddings == "tuned"  # what the fine-tune wrote into the lookup is new
    hidden = Probing(**settings, embeddings="tuned")(ModelPair(base, relabeled), small_task, small_task, eval_size=128)
    seen = Probing(**settings)(ModelPair(base, relabeled), small_task, small_task, eval_size=128)
    assert hidden.headline["probe_best_tuned"] < hidden.headline["probe_best_base"] - 0.2 and hidden.value < 0.5
    assert seen.headline["probe_best_tuned"] == seen.headline["probe_best_base"]
    assert seen.headline["probe_best_untrained"] > hidden.headline["probe_best_untrained"]
    assert seen.direction == "neutral" and "cannot tell" in seen.summary
    assert all(torch.equal(before[k], v) for k, v in relabeled.weights().items())  # probed on a copy
    with pytest.raises(ConfigError, match="embeddings must be 'tuned' or 'base'"):
        Probing(embeddings="input")


def test_a_hook_without_positions_is_refused_and_figures_name_their_analyzer(small_model, small_task):
    pair = ModelPair(small_model, small_model.clone())
    with pytest.raises(ConfigError, match=r"probes read one position's activation per sequence.*hook_pattern is "
                                          r"\[.*\] \(attention: \[batch, head, query, key\]\)"):
        Probing(n=64, steps=5, hooks="blocks.0.attn.hook_pattern")(pair, small_task, small_task, eval_size=16)
    evidence = NewLatentProbing(n=64, steps=5)(pair, small_task, small_task, eval_size=16)
    assert evidence.figure().layout.title.text.startswith("new latent: ")
