"""Residency: models that take turns in memory, and diagnose(memory="low") on it.

Real models on every backend of the installed TransformerLens, the shipped demo checkpoint (whose
weights are read from a memory-mapped file), and the same diagnosis run both ways.
"""

from __future__ import annotations

import math

import pytest
import torch

from capwrap.errors import ConfigError
from capwrap.models import build_model, load_model, save_model, tl_version
from capwrap.models.residency import Residency


def _perturbed(model, seed: int = 0):
    out = model.clone()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in out.weights().values():
            w.add_(0.1 * torch.randn(w.shape, generator=gen))
    return out


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.weights().items()}


def _weight_storages(model) -> list[torch.UntypedStorage]:
    """The storages the model's canonical weights live in (a backend's own extras outside them,
    such as HookedTransformer's zero biases for a bias-free family, are not weights and stay)."""
    return list({v.untyped_storage().data_ptr(): v.untyped_storage() for v in model.weights().values()}.values())


def _freed(storages: list[torch.UntypedStorage]) -> bool:
    return all(s.nbytes() == 0 for s in storages)


def test_members_take_turns_and_come_back_bit_for_bit(small_model, small_task):
    base, tuned = small_model, _perturbed(small_model)
    tokens = small_task.sample(8, seed=0).tokens
    expected = {"base": (_snapshot(base), base(tokens)), "tuned": (_snapshot(tuned), tuned(tokens))}
    storages = {id(m): _weight_storages(m) for m in (base, tuned)}
    with Residency() as residency:
        residency.add(base)
        residency.add(tuned)
        assert _freed(storages[id(base)]) and not _freed(storages[id(tuned)])
        for _ in range(2):  # back and forth: the file is written once, read each time
            for name, model in (("base", base), ("tuned", tuned)):
                logits = model(tokens)  # running a released model brings it back
                assert residency.is_resident(model)
                other = tuned if model is base else base
                assert _freed(storages[id(other)])
                weights, want = expected[name]
                assert torch.equal(logits, want)
                assert all(torch.equal(model.weights()[k], v) for k, v in weights.items())
    # closed: both back in memory, as given
    assert base._residency is None and tuned._residency is None
    assert torch.equal(base(tokens), expected["base"][1]) and torch.equal(tuned(tokens), expected["tuned"][1])


def test_a_discarded_member_is_not_read_back(small_model):
    base, control = small_model, _perturbed(small_model)
    storages = _weight_storages(control)
    with Residency() as residency:
        residency.add(control)
        residency.add(base)  # control released
        residency.remove(control, restore=False)
        assert control not in residency and control._residency is None
        assert _freed(storages)  # no memory spent on a model about to be dropped
        residency.add(_perturbed(base, seed=1))  # the others keep taking turns
        assert not residency.is_resident(base)


def test_a_released_models_weights_are_read_one_at_a_time(small_model):
    base, tuned = small_model, _perturbed(small_model)
    want, storages = _snapshot(tuned), _weight_storages(tuned)
    with Residency() as residency:
        residency.add(tuned)
        residency.add(base)  # tuned released
        for name, value in want.items():  # canonical views: transposed, strided, per-head ...
            got = residency.read_weight(tuned, name)
            assert got.shape == value.shape and torch.equal(got, value), name
        assert _freed(storages)  # reading did not bring it back
        assert residency.read_weight(base, "blocks.0.attn.W_Q") is not None


def test_scratch_work_is_undone_and_changes_outside_it_are_kept(small_model, small_task):
    base, tuned = small_model, _perturbed(small_model)
    tokens = small_task.sample(4, seed=1).tokens
    before = tuned(tokens)
    with Residency() as residency:
        residency.add(base)
        residency.add(tuned)
        with residency.scratch(tuned) as work:
            assert work is tuned
            with torch.no_grad():
                work.weights()["blocks.0.mlp.W_out"].zero_()
            assert not torch.equal(work(tokens), before)
            with pytest.raises(ConfigError, match="lent by Residency.scratch"):
                base(tokens)  # the lent model cannot be swapped out mid-work
            residency.revert(tuned)
            assert torch.equal(work(tokens), before)
            with torch.no_grad():
                work.weights()["blocks.1.mlp.W_out"].mul_(2)
        assert torch.equal(tuned(tokens), before)  # undone on exit
        # a change made outside scratch is the model's: written out when released, kept
        with torch.no_grad():
            tuned.weights()["blocks.0.attn.W_V"].mul_(-1)
        changed = tuned(tokens)
        base(tokens)
        assert torch.equal(tuned(tokens), changed)
        # ... and so is an optimizer's step on the module's parameters
        optimizer = torch.optim.SGD(tuned.parameters(), lr=0.1)
        tuned(tokens).square().mean().backward()
        optimizer.step()
        stepped = tuned(tokens).detach()
        assert not torch.equal(stepped, changed)
        base(tokens)
        assert torch.equal(tuned(tokens), stepped)


def test_weights_read_from_a_memory_mapped_checkpoint_become_the_models_own(tmp_path, small_model, small_task):
    """safetensors hands out weights on the checkpoint file's memory map, which cannot be freed:
    they are moved into memory of the model's own when it joins."""
    save_model(small_model, tmp_path / "m")
    loaded = load_model(tmp_path / "m", backend=small_model.backend)
    tokens = small_task.sample(4, seed=2).tokens
    want = loaded(tokens)
    with Residency() as residency:
        residency.add(loaded)
        storages = _weight_storages(loaded)  # its own memory now
        residency.add(small_model.clone())
        assert _freed(storages)
        assert torch.equal(loaded(tokens), want)


def test_bad_uses_are_named(small_model):
    other = small_model.clone()
    with Residency() as first, Residency() as second:
        first.add(small_model)
        with pytest.raises(ConfigError, match="another Residency"):
            second.add(small_model)
        with pytest.raises(ConfigError, match="not a member"):
            first.read_weight(other, "embed.W_E")
        with pytest.raises(ConfigError, match="cannot move"):
            small_model.to("meta")
        with pytest.raises(ConfigError, match="only a model lent"):
            first.revert(small_model)


def _same_numbers(a, b, path: str = "") -> list[str]:
    """Paths where two JSON-like results differ (seconds aside)."""
    if isinstance(a, dict):
        return [d for k in a if k != "seconds" for d in _same_numbers(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _same_numbers(x, y, f"{path}[{i}]")]
    if isinstance(a, float):
        same = a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-5 * max(1.0, abs(a))
        return [] if same else [f"{path}: {a} vs {b}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def _demo_pair(backend: str | None = None):
    """The demo's base and a copy of it with block 1's weights moved (seeded)."""
    from capwrap.demo import DEMO_BASE

    base = load_model(str(DEMO_BASE), backend=backend)
    tuned = base.clone()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, w in tuned.weights().items():
            if name.startswith("blocks.1."):
                w.add_(0.05 * torch.randn(w.shape, generator=gen))
    return base, tuned


def _demo_pair_analyzers() -> list:
    """Every analyzer, small enough for the demo pair in seconds (the functional ones train, prune
    and graft the models themselves)."""
    import capwrap

    return [
        capwrap.Probing(n=128, steps=20),
        capwrap.Probing(n=128, steps=20, embeddings="base", name="probing_base_embeddings"),
        capwrap.Pruning(ks=(0, 1, 2), score_size=64),
        capwrap.Revival(max_steps=6, batch_size=16, check_size=64, control_steps=4, seeds=1, eval_every=2),
        capwrap.WeightDiff(graft_fractions=(0.1,)),
        capwrap.AttentionComparison(n=16),
        capwrap.Patching(n=8),
        capwrap.Generalization(),
        capwrap.Subgraph(n=8, ig_steps=2),
    ]


def test_diagnose_low_memory_gives_the_same_numbers():
    """Every analyzer (the functional ones train, prune and graft the models themselves and undo it)
    on the demo's base and a copy with one block moved: the same evidence, number for number, as with
    both models in memory; and the models are back, unchanged."""
    import capwrap
    from capwrap.demo import demo_tasks

    base, tuned = _demo_pair()
    weights = {"base": _snapshot(base), "tuned": _snapshot(tuned)}
    tasks = demo_tasks()

    runs = {
        memory: capwrap.diagnose(base, tuned, tasks["capability"], tasks["downstream_correlated"],
                                 analyzers=_demo_pair_analyzers(), eval_size=64, progress=False, memory=memory).to_dict()
        for memory in ("normal", "low")
    }  # fmt: skip
    assert _same_numbers(runs["normal"], runs["low"]) == []
    assert base._residency is None and tuned._residency is None
    for name, model in (("base", base), ("tuned", tuned)):
        assert all(torch.equal(model.weights()[k], v) for k, v in weights[name].items())
    with pytest.raises(ConfigError, match="memory must be one of"):
        capwrap.diagnose(base, tuned, tasks["capability"], tasks["downstream_correlated"], memory="tiny")


@pytest.mark.skipif(tl_version() < (4, 0), reason="TransformerLens 3.9 cannot split GPT-2's offloaded c_attn "
                    "(test_devices.py checks that the load says so)")  # fmt: skip
def test_a_pair_accelerate_offloaded_to_disk_is_diagnosed_with_the_same_numbers(tmp_path):
    """The demo's base and a copy with one block moved, saved, then loaded with accelerate's device_map
    so that all but the embeddings lie on disk: every analyzer, those that edit weights included
    (pruning, grafting, the probes' base embeddings, patching, subgraph), gives the numbers it gives
    on the pair loaded whole; reverse fine-tuning, which would train offloaded weights, says why it
    did not run; and neither model's weights moved."""
    import capwrap
    from capwrap.demo import DEMO_BASE, demo_tasks

    base, tuned = _demo_pair(backend="bridge")
    save_model(tuned, tmp_path / "tuned")
    tasks = demo_tasks()

    def dispatched(folder, name):
        return capwrap.load_model(str(folder), device_map="auto", max_memory={"cpu": "1MB"},
                                  offload_folder=tmp_path / f"offload-{name}")  # fmt: skip

    pair = {"base": dispatched(DEMO_BASE, "base"), "tuned": dispatched(tmp_path / "tuned", "tuned")}
    for model in pair.values():
        assert model.metadata["device_map"]["transformer.wte"] == "cpu" and len(model.offloaded) > 20
    runs = {
        "whole": capwrap.diagnose(base, tuned, tasks["capability"], tasks["downstream_correlated"],
                                  analyzers=_demo_pair_analyzers(), eval_size=64, progress=False, memory="low"),
        "offloaded": capwrap.diagnose(pair["base"], pair["tuned"], tasks["capability"],
                                      tasks["downstream_correlated"], analyzers=_demo_pair_analyzers(), eval_size=64,
                                      progress=False),  # the default memory: a dispatched pair takes turns anyway
    }  # fmt: skip
    revival = runs["offloaded"]["revival"]
    assert not revival.applicable and revival.summary.startswith("reverse fine-tuning not run: accelerate offloaded")
    assert runs["whole"]["revival"].applicable
    numbers = {k: [e.to_dict() for e in d.evidence if e.analyzer != "revival"] for k, d in runs.items()}
    assert [e["analyzer"] for e in numbers["offloaded"]] == ["probing", "probing_base_embeddings", "pruning",
                                                             "weight_diff", "attention", "patching", "subgraph",
                                                             "generalization"]  # fmt: skip
    assert _same_numbers(numbers["whole"], numbers["offloaded"]) == []
    assert runs["offloaded"].accuracy == runs["whole"].accuracy
    for name, model in pair.items():
        assert model._residency is None
        reference = base if name == "base" else tuned
        assert all(torch.equal(w, reference.weights()[k]) for k, w in model.weights().items())
    with pytest.raises(ConfigError, match="cannot be trained: accelerate offloaded"):
        capwrap.train(pair["tuned"], tasks["capability"], capwrap.TrainConfig(steps=1, progress=False))


@pytest.fixture
def cli_pair(tmp_path, monkeypatch, small_task) -> list[str]:
    """Two small Llama folders a perturbation apart, three small analyzers as `--quick`'s, and the
    `capwrap diagnose` arguments that name them (add --out and the option under test)."""
    import capwrap.diagnosis.checkpoints
    from capwrap.analyzers import Pruning, Revival, WeightDiff
    from capwrap.models import ModelSpec

    spec = ModelSpec(d_vocab=small_task.d_vocab, n_ctx=small_task.seq_len, n_layers=2, d_model=32, n_heads=4,
                     architecture="llama", n_key_value_heads=2)  # fmt: skip
    base = build_model(spec, seed=0)
    save_model(base, tmp_path / "base")
    save_model(_perturbed(base), tmp_path / "tuned")
    monkeypatch.setattr(
        capwrap.diagnosis.checkpoints,
        "default_analyzers",
        lambda quick, memory, compiled: [Pruning(ks=(0, 1), score_size=16), WeightDiff(graft_fractions=(0.1,)),
                       Revival(max_steps=2, batch_size=4, eval_every=1, check_size=16, control_steps=2, seeds=1)],
    )  # fmt: skip
    task = "length=12,window=6,occurrence=2"
    return [str(tmp_path / "base"), str(tmp_path / "tuned"), "--capability", f"pcfg=count,operand=a,{task}",
            "--downstream", f"pcfg=count,operand=b,{task}", "--quick", "--quiet", "--backend", "bridge"]  # fmt: skip


def _summaries(tmp_path, capsys, args: list[str], runs: dict[str, list[str]]) -> dict[str, dict]:
    """`capwrap diagnose ARGS --out tmp_path/NAME OPTIONS` for each run; their summary.json."""
    import json

    from capwrap.cli import main

    summaries = {}
    for name, options in runs.items():
        code = main(["diagnose", *args, "--out", str(tmp_path / name), *options])
        assert code == 0, capsys.readouterr().err
        summaries[name] = json.loads((tmp_path / name / "summary.json").read_text())
    return summaries


def test_capwrap_diagnose_memory_low(tmp_path, capsys, cli_pair):
    """`capwrap diagnose --memory low` on two folders: the same evidence as without, written down."""
    summaries = _summaries(tmp_path, capsys, cli_pair, {m: ["--memory", m] for m in ("normal", "low")})
    assert summaries["low"]["memory"] == "low" and summaries["normal"]["memory"] == "normal"
    assert _same_numbers(summaries["normal"]["evidence"], summaries["low"]["evidence"]) == []


def test_capwrap_diagnose_device_map(tmp_path, capsys, cli_pair):
    """`capwrap diagnose --device-map auto --max-memory cpu=...`: each model spread by accelerate with
    most of it on disk, in an offload folder of its own; the same evidence as loaded whole, except
    reverse fine-tuning, which does not run on offloaded weights and says so. Bad options are named."""
    from capwrap.cli import main

    args = cli_pair
    placements = {"whole": [], "dispatched": ["--device-map", "auto", "--max-memory", "cpu=40KB",
                                              "--offload-folder", str(tmp_path / "offload")]}  # fmt: skip
    summaries = _summaries(tmp_path, capsys, args, placements)
    dispatched = summaries["dispatched"]
    assert dispatched["memory"] == "low" and summaries["whole"]["device_map"] is None
    assert "disk" in dispatched["device_map"]["tuned"].values()
    assert sorted(p.name for p in (tmp_path / "offload").iterdir()) == ["base", "tuned"]
    evidence = {name: {e["analyzer"]: e for e in s["evidence"]} for name, s in summaries.items()}
    assert evidence["dispatched"]["revival"]["value"] is None
    assert "reverse fine-tuning not run: accelerate offloaded" in evidence["dispatched"]["revival"]["summary"]
    for analyzer in ("pruning", "weight_diff"):
        assert _same_numbers(evidence["whole"][analyzer], evidence["dispatched"][analyzer]) == []
    for bad, message in (
        (["--device-map", "auto", "--device", "cpu"], "give device or device_map, not both"),
        (["--max-memory", "cpu=1GB"], "max_memory and offload_folder go with device_map"),
        (["--device-map", "auto", "--max-memory", "cpu"], "--max-memory takes DEVICE=SIZE pairs"),
    ):
        capsys.readouterr()
        assert main(["diagnose", *args, *bad]) != 0
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_a_residency_of_a_large_model_makes_freed_tensors_go_back_to_the_system():
    """Tensors of a few MiB (a block's activations, a layer's weights) are returned when freed, not
    kept by the C library's heap. Run in a fresh process: the setting is process-wide."""
    script = r"""
import os, torch
from capwrap.models import ModelSpec, build_model
from capwrap.models.residency import Residency
page = os.sysconf("SC_PAGE_SIZE")
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
def freed_but_resident():
    big = torch.ones(16 * 2**20 // 4)  # by default, freeing a 16 MiB mapping raises glibc's limit to 16 MiB
    del big
    before, held, pins = resident(), [], []
    for _ in range(100):  # 3 MiB tensors, each followed by a small one that outlives it
        held.append(torch.ones(3 * 2**20 // 4))
        pins.append(torch.ones(2**14))
    during = resident()
    del held
    return (during - before) >> 20, (resident() - before) >> 20
small = build_model(ModelSpec(d_vocab=50, n_ctx=8, n_layers=1, d_model=16, n_heads=2))
large = build_model(ModelSpec(d_vocab=50, n_ctx=8, n_layers=1, d_model=2048, n_heads=16, d_mlp=16384))
with Residency() as residency:
    residency.add(small if os.environ["MEMBER"] == "small" else large)
    print(*freed_but_resident())
"""
    import subprocess
    import sys

    if sys.platform != "linux":
        pytest.skip("resident memory is read from /proc")

    def run(member: str) -> tuple[int, int]:
        env = {**__import__("os").environ, "MEMBER": member}
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
        held, kept = map(int, out.stdout.split())
        assert held >= 250
        return held, kept

    assert run("small")[1] >= 250  # glibc's default: the freed 300 MiB stay resident
    assert run("large")[1] < 50


def test_the_kept_weights_digest_follows_changes_a_residency_reads_back(small_model, small_task, monkeypatch):
    """weights_sha256 keeps a model's digest until a weight changes (a diagnosis names the weights twice):
    a change through a tensor, and weights read back from the file (no tensor operation), are seen."""
    import capwrap.provenance as provenance

    tuned = _perturbed(small_model)
    reads = []
    monkeypatch.setattr(provenance, "tensors_sha256", lambda t, read=provenance.tensors_sha256: reads.append(1) or read(t))
    first = provenance.weights_sha256(tuned)
    assert provenance.weights_sha256(tuned) == first and len(reads) == 1  # read once
    with Residency() as residency:
        residency.add(tuned)
        with residency.scratch(tuned) as work:
            with torch.no_grad():
                work.weights()["blocks.0.mlp.W_out"].zero_()
            changed = provenance.weights_sha256(work)
            assert changed != first
            residency.revert(tuned)  # read back from the file into the weights' memory
            assert provenance.weights_sha256(tuned) == first
        residency.release_all()
        assert provenance.weights_sha256(tuned) == first  # freed and read back: the same weights
