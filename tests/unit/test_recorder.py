"""The Recorder: around our loop and around a hand-written one; what it stores is what happened."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from capwrap.errors import ConfigError, HookNameError, StoreError
from capwrap.models import build_model, load_model, save_model
from capwrap.models.layouts import canonical_views
from capwrap.recording import Recorder, RunStore, load_probe, start_weights
from capwrap.recording.weight_sample import match_steps
from capwrap.tasks import answer_loss
from capwrap.training import StopTraining, TrainConfig, train


def test_records_what_the_model_computed(small_model, small_task, tmp_path):
    probe = small_task.sample(24, seed=9)
    before = small_model.capture(probe.tokens, "blocks.*.hook_resid_post")
    start = {k: v.detach().clone() for k, v in small_model.weights().items()}
    rec = Recorder(small_model, tmp_path / "run", probe=probe, every=3)
    train(small_model, small_task, TrainConfig(steps=7, batch_size=8, lr=1e-2, progress=False), recorder=rec)

    store = RunStore.open(tmp_path / "run")
    assert store.steps == list(range(8))
    assert store.array_steps("blocks.1.hook_resid_post") == [0, 3, 6, 7]  # every 3, and the last step
    acts = store.array("blocks.1.hook_resid_post")
    assert acts.shape == (4, 24, small_task.seq_len, 32)
    torch.testing.assert_close(acts[0], before["blocks.1.hook_resid_post"])
    assert not torch.allclose(acts[2], acts[0])
    after = small_model.capture(probe.tokens, "blocks.*.hook_resid_post")["blocks.1.hook_resid_post"]
    torch.testing.assert_close(acts[-1], after)  # the recording ends with the model the run ends with

    # weight change per head at step 0 is zero; the last record is the change the run made
    heads = store.array("weight_delta.head")
    assert heads[0].abs().sum() == 0 and heads[-1].sum() > 0
    assert store.meta["components"]["head"][:2] == ["L0H0", "L0H1"]
    scalars = store.scalars()
    assert {"loss", "lr", "grad_norm", "weight_delta", "weight_delta_rel"} <= set(scalars.columns)
    assert scalars["loss"].notna().sum() == 7

    # the saved start weights and probe batch come back exactly
    views = canonical_views(small_model.spec, start_weights(store))
    for name in start:
        torch.testing.assert_close(views[name], start[name])
    assert torch.equal(load_probe(store).tokens, probe.tokens)
    assert torch.equal(load_probe(store).labels["count_a"], probe.labels["count_a"])


def test_head_deltas_equal_the_weight_difference(small_model, small_task, tmp_path):
    start = {k: v.detach().clone() for k, v in small_model.weights().items()}
    rec = Recorder(small_model, tmp_path / "run", hooks=(), every=4)
    train(small_model, small_task, TrainConfig(steps=4, batch_size=8, lr=1e-2, progress=False), recorder=rec)
    now = small_model.weights()
    expected = [
        sum(float((s.of(now).detach() - s.of(start)).pow(2).sum()) for s in c.slices) ** 0.5
        for c in small_model.components.select("head")
    ]
    got = RunStore.open(tmp_path / "run").array("weight_delta.head")[-1]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), rtol=1e-4, atol=1e-6)


class _HostReads(TorchFunctionMode):
    """Counts the calls that read a float tensor (weights, gradients, activations, their norms) back
    to the host: on a GPU, each one waits for the device. Token ids are checked where they are made,
    on the host, and do not count."""

    READS = frozenset({"cpu", "item", "tolist", "numpy", "__float__", "__int__", "__bool__"})

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS and args and args[0].is_floating_point():
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_training_loop_never_waits_for_the_device(small_model, small_task, tmp_path):
    """On a GPU a read-back waits for the device. The training thread reads nothing back, on a plain
    step or a recorded one, with the loss given as a tensor: norms stay on the device and the writer
    thread reads them (before this, a record read back 332 times on the demo model, once per weight
    and kind, and every step once for the gradient norm)."""
    with Recorder(small_model, tmp_path / "run", probe=small_task.sample(8, seed=0), every=2) as rec:
        batch = small_task.sample(8, seed=1)
        loss = answer_loss(small_model(batch.tokens), batch)
        loss.backward()
        reads = [_HostReads(), _HostReads()]
        for mode in reads:  # a plain step, then a recorded one
            with mode:
                rec.step(loss=loss, custom=torch.tensor(2.5))
    assert [r.count for r in reads] == [0, 0]
    scalars = RunStore.open(tmp_path / "run").scalars()
    assert scalars["loss"].iloc[-1] == pytest.approx(loss.item())
    assert scalars["custom"].iloc[-1] == 2.5 and scalars["grad_norm"].iloc[1:].notna().all()


def test_a_record_launches_a_few_operations_per_weight_not_per_weight_and_kind(small_model, small_task, tmp_path):
    """On a GPU each operation is a kernel launch (~10 microseconds of Python and driver): a record
    of 7 component kinds launched 2,063 on the demo model, 11 per weight and kind; now 330."""
    with Recorder(small_model, tmp_path / "run", hooks=(), every=1) as rec:
        batch = small_task.sample(8, seed=1)
        answer_loss(small_model(batch.tokens), batch).backward()
        with _Operations() as ops:
            rec.step(loss=None)
    n_weights = len(small_model.weights())
    assert len(rec.component_kinds) >= 5
    assert ops.count <= 7 * n_weights, (ops.count, n_weights)


def _recorded_run(model, task, path, background: bool) -> RunStore:
    rec = Recorder(model, path, probe=task.sample(24, seed=9), every=3, background=background)
    train(model, task, TrainConfig(steps=7, batch_size=8, lr=1e-2, progress=False, seed=0), recorder=rec)
    return RunStore.open(path)


def test_a_background_record_stores_exactly_what_an_inline_one_does(small_model, small_task, tmp_path):
    """The copy measured in the background has the weights of the step it was taken at, so the
    store is the same to the bit, although training ran on while the copy was measured."""
    inline = _recorded_run(small_model.clone(), small_task, tmp_path / "inline", background=False)
    background = _recorded_run(small_model.clone(), small_task, tmp_path / "background", background=True)
    assert background.steps == inline.steps == list(range(8))
    assert background.scalars().equals(inline.scalars())
    assert sorted(background.array_names) == sorted(inline.array_names)
    for name in inline.array_names:
        assert background.array_steps(name) == inline.array_steps(name), name
        assert torch.equal(background.array(name), inline.array(name)), name
    assert background.array("weight_delta.head")[-1].sum() > 0  # the weights did move


def test_a_background_record_leaves_the_probe_to_another_thread(small_model, small_task, tmp_path):
    """In the training thread a background record only copies the weights and takes the gradients'
    norms: the probe's forward passes run in the writer thread, and nothing is read back from the
    device in the training thread."""
    import threading

    batch = small_task.sample(8, seed=1)
    ran_in: dict[bool, set[str]] = {}
    for background in (False, True):
        model = small_model.clone()
        with Recorder(model, tmp_path / f"run{background}", probe=small_task.sample(16, seed=0), every=1,
                      background=background) as rec:  # fmt: skip
            answer_loss(model(batch.tokens), batch).backward()
            rec.flush()
            threads: set[str] = set()
            hook = torch.nn.modules.module.register_module_forward_hook(
                lambda module, args, output, seen=threads: seen.add(threading.current_thread().name)
            )
            try:
                with _HostReads() as reads:
                    rec.step(loss=None)
                rec.flush()
            finally:
                hook.remove()
            assert reads.count == 0
        ran_in[background] = threads
    assert ran_in == {False: {threading.current_thread().name}, True: {"capwrap-recorder-writer"}}


def test_a_failed_background_write_is_raised_and_nothing_waits_forever(small_model, small_task, tmp_path):
    import shutil
    import threading

    rec = Recorder(small_model, tmp_path / "run", probe=small_task.sample(8, seed=0), every=1, background=True)
    rec.open()
    rec.flush()  # step 0 is written
    shutil.rmtree(tmp_path / "run" / "arrays")  # the next append cannot write its arrays
    raised: list[BaseException] = []

    def steps() -> None:
        for _ in range(4):  # each step after the failure raises, and none waits for the copy forever
            try:
                rec.step(loss=1.0)
            except StoreError as exc:
                raised.append(exc)
        try:
            rec.close()
        except StoreError as exc:
            raised.append(exc)

    worker = threading.Thread(target=steps, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "a failed background record left the training thread waiting"
    assert len(raised) >= 3 and all("writing the run store failed" in str(exc) for exc in raised)
    assert RunStore.open(tmp_path / "run").steps == [0]  # nothing written after the failure


class _Operations(TorchDispatchMode):
    """Counts the operations that reach a kernel (tensor metadata calls excluded)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ not in ("view", "detach", "permute", "split_with_sizes", "t")
        return func(*args, **(kwargs or {}))


def _record_one_sgd_step(model, task, path, lr: float) -> dict[str, torch.Tensor]:
    """Record one plain gradient step of ``model`` into a store at ``path``; the weights before it."""
    start = {k: v.detach().clone() for k, v in model.weights().items()}
    with Recorder(model, path, hooks=(), every=1) as rec:
        batch = task.sample(8, seed=1)
        answer_loss(model(batch.tokens), batch).backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.sub_(lr * p.grad)
        rec.step(loss=None)
    return start


def test_records_a_float64_model_in_float64(small_model, small_task, tmp_path):
    model = load_model(save_model(small_model, tmp_path / "m"), dtype="float64")
    start = _record_one_sgd_step(model, small_task, tmp_path / "run", lr=1e-2)
    delta = sum(float((w.detach() - start[k]).square().sum()) for k, w in model.weights().items()) ** 0.5
    assert delta > 0
    recorded = RunStore.open(tmp_path / "run").scalars()["weight_delta"].iloc[-1]
    assert recorded == pytest.approx(delta, rel=1e-12)


def test_attaches_to_a_hand_written_loop_and_resumes(small_model, small_task, tmp_path):
    opt = torch.optim.SGD(small_model.parameters(), lr=0.05)
    probe = small_task.sample(8, seed=0)

    def run(rec, n):
        for i in range(n):
            batch = small_task.sample(8, seed=i)
            loss = answer_loss(small_model(batch.tokens), batch)
            loss.backward()
            opt.step()
            rec.step(loss=loss.item(), custom=float(i))
            opt.zero_grad()

    with Recorder(small_model, tmp_path / "run", probe=probe, every=2) as rec:
        run(rec, 3)
    with pytest.raises(StoreError, match="resume"):
        Recorder(small_model, tmp_path / "run", probe=probe, every=2).open()
    with Recorder(small_model, tmp_path / "run", probe=probe, every=2, resume=True) as rec:
        assert rec.current_step == 3
        run(rec, 3)
    store = RunStore.open(tmp_path / "run")
    assert store.steps == list(range(7))
    assert store.array_steps("blocks.0.hook_resid_post") == [0, 2, 4, 6]
    assert store.scalars()["custom"].dropna().tolist() == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0]
    grads = store.array("grad_norm.neuron")
    assert grads.shape[1] == len(small_model.components.select("neuron")) and grads[-1].sum() > 0


def test_a_resumed_recorder_takes_its_settings_from_the_store(small_model, small_task, tmp_path):
    probe = small_task.sample(6, seed=2)
    with Recorder(small_model, tmp_path / "run", hooks="blocks.0.hook_resid_post", probe=probe, every=2,
                  component_kinds=("head",), dtype="float16"):  # fmt: skip
        pass
    rec = Recorder(small_model, tmp_path / "run", resume=True)
    assert (rec.hooks, rec.every, rec.component_kinds, rec.dtype) == (
        ["blocks.0.hook_resid_post"],
        2,
        ["head"],
        "float16",
    )
    assert torch.equal(rec.probe.tokens, probe.tokens)
    with pytest.raises(StoreError, match="every 2 steps"):
        Recorder(small_model, tmp_path / "run", every=3, resume=True).open()
    RunStore.create(tmp_path / "plain").close()
    with pytest.raises(StoreError, match="not written by a Recorder"):
        Recorder(small_model, tmp_path / "plain", resume=True)


def test_resume_with_another_model_shape_is_refused(small_model, small_task, tmp_path):
    with Recorder(small_model, tmp_path / "run", hooks=()):
        pass
    from capwrap.models import ModelSpec

    other = build_model(
        ModelSpec(d_vocab=small_model.spec.d_vocab, n_ctx=small_model.spec.n_ctx, n_layers=1, d_model=16, n_heads=2)
    )
    with pytest.raises(StoreError, match="another shape"):
        Recorder(other, tmp_path / "run", hooks=(), resume=True).open()
    # a store that records hooks the other model lacks (blocks.1): the shape is named, not the hook
    probe = small_task.sample(4, seed=0)
    with Recorder(small_model, tmp_path / "hooked", hooks="blocks.*.hook_resid_post", probe=probe):
        pass
    with pytest.raises(StoreError, match=r"another shape: it differs in n_layers \(1 vs 2\)"):
        Recorder(other, tmp_path / "hooked", resume=True)


def test_bad_recorder_arguments(small_model, small_task, tmp_path):
    probe = small_task.sample(4, seed=0)
    with pytest.raises(HookNameError, match="closest valid names"):
        Recorder(small_model, tmp_path / "r", hooks="blocks.*.resid_post", probe=probe)
    with pytest.raises(ConfigError, match="needs a fixed probe batch"):
        Recorder(small_model, tmp_path / "r")
    long = torch.zeros(2, small_model.spec.n_ctx + 5, dtype=torch.long)
    with pytest.raises(ConfigError, match="probe batch has .* positions but the model's context"):
        Recorder(small_model, tmp_path / "r", probe=long)
    with pytest.raises(ConfigError, match="every"):
        Recorder(small_model, tmp_path / "r", probe=probe, every=0)
    with pytest.raises(StoreError, match="not open"):
        Recorder(small_model, tmp_path / "r", probe=probe).step(loss=1.0)
    with pytest.raises(ConfigError, match="hooks='' names no hook"):
        Recorder(small_model, tmp_path / "r", hooks="", probe=probe)
    with pytest.raises(ConfigError, match="integer token ids, got dtype torch.float32"):
        Recorder(small_model, tmp_path / "r", probe=torch.rand(4, 8))
    with pytest.raises(ConfigError, match="must have shape \\[batch, pos\\]"):
        Recorder(small_model, tmp_path / "r", probe=torch.zeros(8, dtype=torch.long))
    with pytest.raises(ConfigError, match="probe must be a TaskBatch"):
        Recorder(small_model, tmp_path / "r", probe=[[1, 2, 3]])
    with pytest.raises(ConfigError, match="background must be True or False"):
        Recorder(small_model, tmp_path / "r", probe=probe, background="yes")
    with Recorder(small_model, tmp_path / "ok", hooks=(), every=1) as rec:  # metrics: checked at the call
        with pytest.raises(ConfigError, match="pass one real number"):
            rec.step(loss=torch.ones(3))
        with pytest.raises(ConfigError, match="pass one real number"):
            rec.step(score=torch.tensor(1 + 2j))
        with pytest.raises(ConfigError, match="'score' is 'high', not a number"):
            rec.step(score="high")
        rec.step(loss=torch.tensor(0.5))  # the store is intact: the bad calls recorded nothing
    assert RunStore.open(tmp_path / "ok").scalars()["loss"].tolist()[-1] == 0.5


def test_gradients_left_on_the_model_are_no_step_of_the_run(small_model, small_task, tmp_path):
    """``train`` leaves no gradients behind, and a recorder opened on a model that holds some (a pass
    of the user's own before it) does not record them as step 0's: gradient arrays start at the first
    due step. Until 2026-12-07 a second recorded run on a trained model stored the first run's last
    gradients at step 0, one record more than the guide says."""
    config = TrainConfig(steps=3, batch_size=8, progress=False)
    train(small_model, small_task, config)
    assert all(p.grad is None for p in small_model.module.parameters())  # no model-sized buffer left behind
    batch = small_task.sample(8, seed=0)
    answer_loss(small_model(batch.tokens), batch).backward()  # gradients of someone else's pass
    recorder = Recorder(small_model, tmp_path / "run", hooks=(), every=2)
    train(small_model, small_task, TrainConfig(steps=4, batch_size=8, progress=False), recorder=recorder)
    store = RunStore.open(tmp_path / "run")
    assert store.array_steps("weight_delta.head") == [0, 2, 4]
    assert store.array_steps("grad_norm.head") == [2, 4]


def test_a_tied_embedding_counts_once_in_the_weight_change(small_spec, small_task, backend, tmp_path):
    """``weight_delta`` is over the parameters, as ``grad_norm`` is: a tied embedding, which the
    model's weights show twice (W_E and W_U, one memory), counts once (twice until 2026-12-07)."""
    import dataclasses

    model = build_model(dataclasses.replace(small_spec, tie_embeddings=True), backend=backend, seed=0)
    start = _record_one_sgd_step(model, small_task, tmp_path / "run", lr=1e-1)
    change = {k: float((w.detach() - start[k]).double().square().sum()) for k, w in model.weights().items()}
    assert change["embed.W_E"] > 0 and change["unembed.W_U"] == pytest.approx(change["embed.W_E"])
    scalars = RunStore.open(tmp_path / "run").scalars()
    once = sum(v for k, v in change.items() if k != "unembed.W_U") ** 0.5
    assert scalars["weight_delta"].iloc[-1] == pytest.approx(once, rel=1e-6)
    assert scalars["weight_delta"].iloc[-1] != pytest.approx(sum(change.values()) ** 0.5, rel=1e-3)
    start_norm = sum(float(v.double().square().sum()) for k, v in start.items() if k != "unembed.W_U") ** 0.5
    assert scalars["weight_delta_rel"].iloc[-1] == pytest.approx(once / start_norm, rel=1e-6)


def test_a_resumed_recorder_refuses_settings_other_than_its_stores(small_model, small_task, tmp_path):
    """Given to a resumed recorder, the probe, dtype and component kinds must be the store's: another
    probe's activations would be filed under the store's probe.safetensors (silently, until 2026-12-07)."""
    probe = small_task.sample(6, seed=2)
    with Recorder(small_model, tmp_path / "run", hooks="blocks.0.hook_resid_post", probe=probe, every=2):
        pass
    other = small_task.sample(6, seed=3)
    for given, named in [({"probe": other}, "the probe batch"), ({"probe": other.tokens}, "the probe batch"),
                         ({"dtype": "float16"}, "dtype .'float16' given, the store's 'float32'"),
                         ({"component_kinds": ("head",)}, r"component_kinds \(\['head'\] given")]:  # fmt: skip
        with pytest.raises(StoreError, match=f"recorded with other settings: {named}"):
            Recorder(small_model, tmp_path / "run", resume=True, **given)
    # the same settings given, or the tokens alone of the same probe, resume
    Recorder(small_model, tmp_path / "run", resume=True, probe=probe, dtype="float32").open().close()
    Recorder(small_model, tmp_path / "run", resume=True, probe=probe.tokens).open().close()


def test_a_new_store_of_a_resumed_run_numbers_on_from_its_first_step(small_model, small_task, tmp_path):
    with Recorder(small_model, tmp_path / "run", probe=small_task.sample(4, seed=0), every=2, first_step=4) as rec:
        for _ in range(3):
            rec.step(loss=1.0)
    store = RunStore.open(tmp_path / "run")
    assert store.steps == [4, 5, 6, 7] and store.array_steps("blocks.0.hook_resid_post") == [4, 6]
    assert store.meta["first_step"] == 4
    with pytest.raises(ConfigError, match="first_step is for a new store"):
        Recorder(small_model, tmp_path / "run", resume=True, first_step=2)
    with pytest.raises(ConfigError, match="first_step must be a step count"):
        Recorder(small_model, tmp_path / "other", hooks=(), first_step=-1)


def test_a_run_a_callback_stops_ends_its_recording_with_the_model_it_ends_with(small_model, small_task, tmp_path):
    def stop_at_5(info):
        if info.step == 5:
            raise StopTraining

    recorder = Recorder(small_model, tmp_path / "run", probe=small_task.sample(8, seed=0), every=4)
    result = train(small_model, small_task, TrainConfig(steps=8, batch_size=8, lr=1e-2, progress=False),
                   recorder=recorder, callbacks=[stop_at_5, lambda info: info.metrics.update(mine=info.step, note="x",
                                                                                         final=1.0)])  # fmt: skip
    store = RunStore.open(tmp_path / "run")
    assert len(result.history) == 5 and store.array_steps("blocks.1.hook_resid_post") == [0, 4, 5]
    assert store.scalars()["mine"].loc[1:].tolist() == [1, 2, 3, 4, 5]  # a callback's metrics reach the store too
    # (its text, and a name the recorder takes itself, stay in the history)
    assert "note" not in store.scalars() and "final" not in store.scalars() and (result.history["note"] == "x").all()
    assert match_steps(store, small_model.weights().__getitem__).steps == [5]


def test_finish_makes_the_last_step_a_full_record_once(small_model, small_task, tmp_path):
    """A loop of one's own that ends before it planned: finish() measures the model the last step left,
    keeping that step's scalars and arrays."""
    batch = small_task.sample(8, seed=1)
    optimizer = torch.optim.SGD(small_model.parameters(), lr=1e-2)
    with Recorder(small_model, tmp_path / "run", probe=small_task.sample(8, seed=0), every=4) as rec:
        for step in range(3):
            answer_loss(small_model(batch.tokens), batch).backward()
            optimizer.step()
            rec.step(loss=float(step), arrays={"mine": torch.full((2,), float(step))})
            optimizer.zero_grad(set_to_none=True)
        rec.finish()
        rec.finish()
    store = RunStore.open(tmp_path / "run")
    assert store.steps == [0, 1, 2, 3] and store.array_steps("blocks.0.hook_resid_post") == [0, 3]
    assert store.scalars()["loss"].loc[1:].tolist() == [0.0, 1.0, 2.0]
    assert store.array("mine")[-1].tolist() == [2.0, 2.0] and store.array_steps("mine") == [1, 2, 3]
    assert store.array_steps("grad_norm.head") == []  # the gradients were gone
    assert match_steps(store, small_model.weights().__getitem__).ends_the_run


def test_component_kinds_must_be_known_kinds(small_model, small_task, tmp_path):
    """A misspelt kind or a bare string recorded no weight or gradient arrays at all, silently, until
    2026-12-08; a valid kind the model lacks is still dropped quietly."""
    with pytest.raises(ConfigError, match=r"unknown component kind 'heads' in component_kinds; did you mean \['head'"):
        Recorder(small_model, tmp_path / "r", hooks=(), component_kinds=["heads"])
    with pytest.raises(ConfigError, match=r"got the string 'head'; pass \['head'\] for one kind"):
        Recorder(small_model, tmp_path / "r", hooks=(), component_kinds="head")
    with pytest.raises(ConfigError, match=r"unknown component kinds 3, 'mlps'.*Choose from \['embed'"):
        Recorder(small_model, tmp_path / "r", hooks=(), component_kinds=("head", 3, "mlps"))
    with pytest.raises(ConfigError, match="must be a list of kinds"):
        Recorder(small_model, tmp_path / "r", hooks=(), component_kinds=7)
    assert not (tmp_path / "r").exists()
    rec = Recorder(small_model, tmp_path / "ok", hooks=(), component_kinds=("head", "kv_head", "mlp"))
    assert rec.component_kinds == ["head", "mlp"]  # this model has no grouped key/value heads
    with rec:
        pass
    assert {"weight_delta.head", "weight_delta.mlp"} <= set(RunStore.open(tmp_path / "ok").array_names)


def test_a_store_a_recorder_cannot_create_gets_a_store_error(small_model, small_task, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="notes.txt is a file, not a folder"):
        Recorder(small_model, tmp_path / "notes.txt" / "run", hooks=()).open()
    writer = RunStore.create(tmp_path / "live")  # another run appending to the store
    with pytest.raises(StoreError, match="Another process is appending to .*overwrite=True refuses to delete it"):
        Recorder(small_model, tmp_path / "live", hooks=(), overwrite=True).open()
    writer.append(0, scalars={"loss": 1.0})
    writer.close()
    assert RunStore.open(tmp_path / "live").steps == [0]
