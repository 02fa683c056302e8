"""What only a CUDA device can show: every analyzer, ``diagnose()`` (both memory modes), ``train()``
with each training method and recording, ``Trainer`` with ``RecorderCallback``, and accelerate's
``device_map`` splitting a model between the GPU and the CPU — each run on the GPU and compared
with the same computation on the CPU.

Skipped where no CUDA device is present (CI, the project's CPU machines). Run on a GPU machine:

    python -m pytest tests/gpu -q -p no:cacheprovider

GPU arithmetic differs from the CPU's in the last bits (other kernels, other summation orders), and
training amplifies those bits a little, so values are compared within tolerances that say what they
allow; verdicts and the fields a user reads must be the same.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from small_analyzers import ANALYZERS

from capwrap.analyzers import ModelPair
from capwrap.analyzers.checks import check_analyzer
from capwrap.models import ModelSpec, build_model, load_model, save_model
from capwrap.tasks import PCFGConfig, PCFGTask
from capwrap.training import TrainConfig, train

#: The device under test. ``CAPWRAP_TEST_DEVICE=cpu`` runs the file's own logic on a CPU machine (each
#: comparison then holds trivially; the test that splits a model between devices is skipped).
DEVICE = os.environ.get("CAPWRAP_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

CONFIG = PCFGConfig(length=10, window=5, occurrence=2)
CAPABILITY = PCFGTask("count", "a", config=CONFIG)
DOWNSTREAM = PCFGTask("count", "b", correlation=1.0, config=CONFIG)
SPEC = ModelSpec(d_vocab=CAPABILITY.d_vocab, n_ctx=CAPABILITY.seq_len, n_layers=2, d_model=32, n_heads=4)


@pytest.fixture(scope="module")
def cpu_pair() -> ModelPair:
    base = build_model(SPEC, seed=0)
    train(base, PCFGTask(("count", "index"), prior=(0.9, 0.1, 0.0), config=CONFIG),
          TrainConfig(steps=80, batch_size=64, lr=3e-3, progress=False))  # fmt: skip
    tuned = base.clone()
    train(tuned, DOWNSTREAM, TrainConfig(steps=20, batch_size=64, lr=3e-3, seed=1, progress=False))
    return ModelPair(base, tuned)


@pytest.fixture(scope="module")
def cuda_pair(cpu_pair) -> ModelPair:
    return ModelPair(cpu_pair.base.clone().to(DEVICE), cpu_pair.tuned.clone().to(DEVICE))


def _close(a: float, b: float, tol: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


@pytest.mark.parametrize("name", sorted(ANALYZERS))
def test_every_analyzer_keeps_the_contract_on_cuda_and_agrees_with_the_cpu(name, cpu_pair, cuda_pair,
                                                                           record_property):  # fmt: skip
    factory = ANALYZERS[name]
    on_gpu = check_analyzer(factory(), cuda_pair, CAPABILITY, DOWNSTREAM, eval_size=64)
    assert all(w.device.type == DEVICE for m in (cuda_pair.base, cuda_pair.tuned) for w in m.weights().values())
    on_cpu = factory()(cpu_pair, CAPABILITY, DOWNSTREAM, eval_size=64, seed=0)
    record_property("cuda_value", on_gpu.value)
    record_property("cpu_value", on_cpu.value)
    # Revival and pruning train or rank by small differences; probes' accuracies move in steps of one
    # held-out sequence (divided by a margin); the others read the models.
    tol = 0.1 if name in ("revival", "pruning", "subgraph", "probing", "new_latent") else 0.02
    assert _close(on_gpu.value, on_cpu.value, tol), f"{name}: cuda {on_gpu.value} vs cpu {on_cpu.value}"


@pytest.mark.parametrize("memory", ["normal", "low"])
def test_diagnose_on_cuda_gives_the_cpu_verdict(memory, cpu_pair, cuda_pair, record_property):
    from capwrap import diagnose
    from capwrap.analyzers import Revival

    def analyzers():
        chosen = {name: factory() for name, factory in ANALYZERS.items()}
        chosen["revival"] = Revival(max_steps=10, eval_every=5, check_size=32, control_steps=5, batch_size=16, seeds=2,
                                    low_memory=memory == "low")  # fmt: skip
        return list(chosen.values())

    kwargs = dict(eval_size=128, progress=False, n_boot=50, memory=memory)
    on_gpu = diagnose(cuda_pair.base, cuda_pair.tuned, CAPABILITY, DOWNSTREAM, analyzers=analyzers(), **kwargs)
    assert cuda_pair.base.device.type == DEVICE and cuda_pair.tuned.device.type == DEVICE  # back where they were
    on_cpu = diagnose(cpu_pair.base, cpu_pair.tuned, CAPABILITY, DOWNSTREAM, analyzers=analyzers(), **kwargs)
    record_property("verdicts", [(f.question, f.verdict, f.score, g.verdict, g.score)
                                 for f, g in zip(on_gpu.findings, on_cpu.findings, strict=True)])  # fmt: skip
    for finding, expected in zip(on_gpu.findings, on_cpu.findings, strict=True):
        assert finding.verdict == expected.verdict, (finding.question, finding.score, expected.score)
        assert abs(finding.score - expected.score) <= 0.1, (finding.question, finding.score, expected.score)


def test_a_model_moved_to_cuda_trains_and_saves_the_weights_it_computes_with(cpu_pair, tmp_path):
    model = cpu_pair.base.clone().to(DEVICE)
    train(model, DOWNSTREAM, TrainConfig(steps=20, batch_size=64, lr=3e-3, seed=4, progress=False))
    tokens = CAPABILITY.sample(16, seed=0).tokens
    saved = load_model(save_model(model, tmp_path / "trained"))
    torch.testing.assert_close(model(tokens.to(DEVICE)).cpu(), saved(tokens), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("method", "engine"), [("exact", "resumed"), ("exact", "hooks"), ("attribution", "hooks")])
def test_activation_patching_on_cuda_equals_the_cpu(method, engine, cpu_pair, cuda_pair):
    from capwrap.analyzers.patching import activation_patching

    batch = CAPABILITY.sample(8, seed=0)
    kwargs = dict(sites=("resid_pre", "attn_out", "mlp_out", "head"), positions="each", method=method, engine=engine,
                  progress=False)  # fmt: skip
    on_gpu = activation_patching(cuda_pair.tuned, batch, source=cuda_pair.base, **kwargs)
    on_cpu = activation_patching(cpu_pair.tuned, batch, source=cpu_pair.base, **kwargs)
    assert on_gpu.values.device.type == "cpu"
    torch.testing.assert_close(on_gpu.values, on_cpu.values, atol=1e-4, rtol=1e-4)


def test_activation_patching_on_cuda_defaults_to_the_hook_engine_with_gigabytes(cpu_pair, cuda_pair):
    from capwrap.analyzers.patching import activation_patching, engine_settings

    settings = engine_settings(cuda_pair.tuned)
    device = cuda_pair.tuned.device
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    assert settings.engine == "hooks" and 1.0 <= settings.memory_mb <= 4096.0
    assert settings.memory_mb == pytest.approx(min(4096.0, max(1.0, free / 4 / 2**20)), rel=0.05)
    batch = CAPABILITY.sample(8, seed=0)
    kwargs = dict(sites=("resid_pre", "attn_out", "mlp_out", "head"), positions="each", progress=False)
    on_gpu = activation_patching(cuda_pair.tuned, batch, source=cuda_pair.base, **kwargs)
    on_cpu = activation_patching(cpu_pair.tuned, batch, source=cpu_pair.base, **kwargs)  # resumed, 128 MB
    torch.testing.assert_close(on_gpu.values, on_cpu.values, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("engine", ["resumed", "hooks"])
def test_activation_patching_on_cuda_takes_a_metric_that_answers_on_the_cpu(engine, cuda_pair):
    from capwrap.analyzers.patching import activation_patching, answer_logprob

    def on_the_cpu(logits, batch):
        return answer_logprob(logits.cpu(), batch.to("cpu"))

    batch = CAPABILITY.sample(8, seed=0)
    kwargs = dict(sites=("resid_pre", "head"), positions="each", engine=engine, progress=False)
    got = activation_patching(cuda_pair.tuned, batch, source=cuda_pair.base, metric=on_the_cpu, **kwargs)
    expected = activation_patching(cuda_pair.tuned, batch, source=cuda_pair.base, **kwargs)
    torch.testing.assert_close(got.values, expected.values, atol=1e-5, rtol=0)


def test_the_demo_base_pretrains_on_cuda():
    from capwrap.demo import pretrain_demo_base

    config = TrainConfig(steps=5, batch_size=16, lr=1e-3, seed=0, eval_every=5)
    model = pretrain_demo_base(config, progress=False, device=DEVICE)
    assert model.device.type == DEVICE
    on_cpu = pretrain_demo_base(config, progress=False)
    for name, value in on_cpu.metadata["final_metrics"].items():
        assert _close(model.metadata["final_metrics"][name], value, 0.02), name


def test_bfloat16_training_on_cuda_keeps_float32_weights_and_tracks_the_cpu_loss(cpu_pair):
    model = cpu_pair.base.clone()
    config = TrainConfig(steps=30, batch_size=64, lr=1e-3, seed=2, progress=False)
    result = train(model, DOWNSTREAM, config, device=DEVICE, dtype="bfloat16")
    assert model.device.type == DEVICE
    assert all(w.dtype == torch.float32 and w.device.type == DEVICE for w in model.weights().values())
    expected = train(cpu_pair.base.clone(), DOWNSTREAM, config)
    losses, cpu_losses = result.history["loss"].to_numpy(), expected.history["loss"].to_numpy()
    assert abs(losses[-1] - cpu_losses[-1]) < 0.1 * abs(cpu_losses[0])


def test_training_methods_and_recording_run_on_cuda(cpu_pair, tmp_path):
    from capwrap import CircuitTuning, LoRA, Recorder
    from capwrap.methods import NPO, GradientAscent
    from capwrap.recording import RunStore

    config = TrainConfig(steps=10, batch_size=32, lr=1e-3, seed=3, progress=False)
    for method in (CircuitTuning(top_n=20), LoRA(r=4), GradientAscent(retain=CAPABILITY), NPO(retain=CAPABILITY)):
        model = cpu_pair.base.clone().to(DEVICE)
        before = {k: w.detach().clone() for k, w in model.weights().items()}
        path = tmp_path / method.name
        recorder = Recorder(model, path, hooks="blocks.*.hook_resid_post", probe=CAPABILITY.sample(32, seed=0), every=5)
        train(model, DOWNSTREAM, config, method=method, recorder=recorder)
        assert any(not torch.equal(before[k], w) for k, w in model.weights().items()), method.name
        store = RunStore.open(path)
        assert store.array_steps("blocks.0.hook_resid_post") == [0, 5, 10]
        stored = store.array("blocks.1.hook_resid_post")[-1]
        fresh = model.capture(recorder.probe.tokens.to(DEVICE), ["blocks.1.hook_resid_post"])
        torch.testing.assert_close(torch.as_tensor(stored).float(), fresh["blocks.1.hook_resid_post"].float().cpu(),
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
        # the norms the writer thread read back from the device are the weights' own
        delta = {k: (w.detach() - before[k]).cpu() for k, w in model.weights().items()}
        expected = model.components.sq_norms(delta, "head").sqrt().float()
        torch.testing.assert_close(torch.as_tensor(store.array("weight_delta.head")[-1]), expected, rtol=1e-4, atol=1e-6)
        assert store.scalars()["grad_norm"].iloc[1:].notna().all()


def test_a_recording_resumes_on_cuda(cpu_pair, tmp_path):
    from capwrap.models.layouts import canonical_views
    from capwrap.recording import Recorder, RunStore, start_weights
    from capwrap.tasks import answer_loss

    model = cpu_pair.base.clone().to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def run(recorder: Recorder, steps: int) -> None:
        with recorder:
            for i in range(steps):
                batch = DOWNSTREAM.sample(16, seed=i).to(DEVICE)
                answer_loss(model(batch.tokens), batch).backward()
                opt.step()
                recorder.step()
                opt.zero_grad()

    run(Recorder(model, tmp_path / "run", probe=CAPABILITY.sample(16, seed=0), every=2), 4)
    run(Recorder(model, tmp_path / "run", resume=True), 4)  # its start weights come from the file, on the CPU
    store = RunStore.open(tmp_path / "run")
    assert store.steps == list(range(9)) and store.array_steps("blocks.0.hook_resid_post") == [0, 2, 4, 6, 8]
    first = canonical_views(model.spec, start_weights(store))
    moved = sum(float((w.detach().cpu() - first[k]).double().square().sum()) for k, w in model.weights().items())
    assert store.scalars()["weight_delta"].iloc[-1] == pytest.approx(moved**0.5, rel=1e-4)


def test_a_background_recording_on_cuda_equals_the_inline_one(cpu_pair, tmp_path):
    """background=True: the copy is measured on a side stream in the writer thread while the
    training's kernels go on; what it stores is what the inline recorder stores."""
    from capwrap.recording import Recorder, RunStore

    config = TrainConfig(steps=12, batch_size=32, lr=1e-3, seed=3, progress=False)
    stores = {}
    for background in (False, True):
        model = cpu_pair.base.clone().to(DEVICE)
        recorder = Recorder(model, tmp_path / f"run{background}", probe=CAPABILITY.sample(64, seed=0), every=3,
                            background=background)  # fmt: skip
        train(model, DOWNSTREAM, config, recorder=recorder)
        stores[background] = RunStore.open(tmp_path / f"run{background}")
    inline, background = stores[False], stores[True]
    assert background.steps == inline.steps == list(range(13))
    for name in inline.array_names:
        assert background.array_steps(name) == inline.array_steps(name), name
        torch.testing.assert_close(torch.as_tensor(background.array(name)), torch.as_tensor(inline.array(name)),
                                   rtol=1e-5, atol=1e-6, msg=name)  # fmt: skip
    for column in ("weight_delta", "grad_norm", "loss"):
        assert background.scalars()[column].tolist() == pytest.approx(inline.scalars()[column].tolist(), rel=1e-5)


def test_trainer_run_on_cuda_records_with_the_callback(tmp_path):
    transformers = pytest.importorskip("transformers")
    from capwrap.demo import DEMO_BASE, demo_tasks
    from capwrap.integrations import RecorderCallback, task_dataset
    from capwrap.recording import RunStore

    model = transformers.AutoModelForCausalLM.from_pretrained(str(DEMO_BASE))
    tasks = demo_tasks()
    args = transformers.TrainingArguments(str(tmp_path / "trainer"), max_steps=20, per_device_train_batch_size=16,
                                          learning_rate=1e-4, report_to=[], save_strategy="no", disable_tqdm=True,
                                          use_cpu=DEVICE == "cpu")  # fmt: skip
    callback = RecorderCallback(tmp_path / "run", probe=tasks["capability"].sample(32, seed=0), every=10)
    transformers.Trainer(model, args, train_dataset=task_dataset(tasks["downstream_correlated"], 20 * 16, seed=0),
                         callbacks=[callback]).train()  # fmt: skip
    assert next(model.parameters()).device.type == DEVICE
    store = RunStore.open(tmp_path / "run")
    assert store.array_steps("blocks.0.hook_resid_post") == [0, 10, 20]
    scalars = store.scalars()
    assert list(scalars.index) == list(range(21)) and scalars.loc[1:, "loss"].notna().all()


@pytest.mark.skipif(DEVICE != "cuda", reason="splits a model between a CUDA device and the CPU")
def test_device_map_splits_a_model_between_gpu_and_cpu_and_analyzers_run_on_it(cpu_pair, tmp_path, record_property):
    from capwrap.errors import ConfigError

    folder = save_model(cpu_pair.tuned, tmp_path / "tuned")
    whole = load_model(folder)
    halves = {"transformer.wte": 0, "transformer.wpe": 0, "transformer.h.0": 0, "transformer.h.1": "cpu",
              "transformer.ln_f": "cpu", "lm_head": 0}  # fmt: skip
    split = load_model(folder, device_map=halves)
    assert set(split.metadata["device_map"].values()) == {"0", "cpu"}, split.metadata["device_map"]
    assert split.device == torch.device("cuda:0")
    from capwrap.recording import Recorder

    with pytest.raises(ConfigError):  # a background recorder's copy needs the model on one device
        Recorder(split, tmp_path / "background", hooks=(), background=True).open()
    assert not (tmp_path / "background").exists()
    tokens = CAPABILITY.sample(16, seed=0).tokens
    torch.testing.assert_close(split(tokens.to(split.device)).float().cpu(), whole(tokens), atol=1e-4, rtol=1e-4)
    from capwrap.models.residency import Residency

    # a dispatched model is not copied: the pair takes turns, and analyzers edit the models in place
    with Residency() as residency:
        pair = ModelPair(cpu_pair.base.clone().to(split.device), split, residency)
        outcome = {}
        for name, factory in sorted(ANALYZERS.items()):
            evidence = factory()(pair, CAPABILITY, DOWNSTREAM, eval_size=64, seed=0)
            if name == "revival":  # the CPU-offloaded block cannot be trained, and the evidence says so
                assert not evidence.applicable and "not run: accelerate offloaded" in evidence.summary
                outcome[name] = "not run"
                continue
            expected = factory()(cpu_pair, CAPABILITY, DOWNSTREAM, eval_size=64, seed=0).value
            assert _close(evidence.value, expected, 0.02), (name, evidence.value, expected)
            outcome[name] = "same"
    record_property("outcome", outcome)
    assert outcome == {name: "not run" if name == "revival" else "same" for name in ANALYZERS}
    torch.testing.assert_close(split(tokens.to(split.device)).float().cpu(), whole(tokens), atol=1e-4, rtol=1e-4)
