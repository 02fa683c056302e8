"""RecorderCallback in real Trainer and SFTTrainer runs: the store capwrap.train writes, the run untouched."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest
import torch
import transformers

from capwrap.analyzers import ModelPair, weight_change_table
from capwrap.analyzers.base import check_store_matches
from capwrap.errors import CapwrapWarning, ConfigError, StoreError
from capwrap.integrations import RecorderCallback, task_dataset
from capwrap.models import load_model
from capwrap.models.live import wrap_hf_model
from capwrap.recording import Recorder, RunStore
from capwrap.recording.weight_sample import match_steps
from capwrap.tasks import PCFGConfig, PCFGTask
from capwrap.training import TrainConfig, train

TASK = PCFGTask("count", "b", correlation=1.0, config=PCFGConfig(length=8, window=4, occurrence=2))
PROBE = PCFGTask("count", "a", config=PCFGConfig(length=8, window=4, occurrence=2)).sample(16, seed=0)


def _arguments(out, **overrides) -> transformers.TrainingArguments:
    options = dict(max_steps=6, per_device_train_batch_size=8, learning_rate=1e-3, lr_scheduler_type="linear",
                   warmup_steps=2, logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True,
                   use_cpu=True, seed=0, data_seed=0)  # fmt: skip
    return transformers.TrainingArguments(str(out), **(options | overrides))


def _layout(store: RunStore) -> tuple:
    return sorted(store.meta), {name: store.array_spec(name) for name in store.array_names}


def test_a_trainer_run_records_the_store_capwrap_train_writes(gpt2_folder, tmp_path):
    data = task_dataset(TASK, 96, seed=0)
    args = _arguments(tmp_path / "trainer", gradient_accumulation_steps=2)
    callback = RecorderCallback(tmp_path / "run", probe=PROBE, hooks="blocks.*.hook_resid_post", every=2)
    recorded = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder)
    trainer = transformers.Trainer(recorded, args, train_dataset=data, callbacks=[callback])
    trainer.train()
    plain = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder)
    transformers.Trainer(
        plain, _arguments(tmp_path / "plain", gradient_accumulation_steps=2), train_dataset=data
    ).train()
    for (name, p), q in zip(recorded.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q), f"recording changed how {name} trains"

    store = RunStore.open(tmp_path / "run")
    assert store.steps == list(range(7)) and store.array_steps("blocks.1.hook_resid_post") == [0, 2, 4, 6]
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    scalars = store.scalars().loc[1:]
    assert scalars["loss"].tolist() == pytest.approx([e["loss"] for e in logged], rel=1e-4)  # mean of 2 micro-batches
    assert scalars["lr"].tolist() == pytest.approx([e["learning_rate"] for e in logged])
    # the norm before clipping, as the Trainer logs it (not the clipped one: it clips to 1.0)
    assert scalars["grad_norm"].tolist() == pytest.approx([e["grad_norm"] for e in logged], rel=1e-4)
    assert scalars["grad_norm"].max() > args.max_grad_norm
    assert (store.array("grad_norm.neuron")[-1] > 0).any()
    heads = weight_change_table(load_model(gpt2_folder), callback.recorder.model, kinds=("head",))
    recorded_heads = store.array("weight_delta.head")[-1].double()
    expected = heads.set_index("component").loc[store.meta["components"]["head"], "change"].to_numpy()
    torch.testing.assert_close(recorded_heads, torch.tensor(expected), rtol=1e-4, atol=1e-6)

    # The same model trained by capwrap.train, recorded with the same settings: the same layout.
    model = load_model(gpt2_folder)
    reference = Recorder(model, tmp_path / "capwrap_run", hooks="blocks.*.hook_resid_post", probe=PROBE, every=2)
    train(model, TASK, TrainConfig(steps=2, batch_size=8, progress=False), recorder=reference)
    assert _layout(store) == _layout(RunStore.open(tmp_path / "capwrap_run"))


@pytest.mark.parametrize("background", [False, True])
def test_recording_a_run_with_dropout_leaves_it_as_it_is(gpt2_folder, tmp_path, background):
    """Dropout draws from torch's generator; wrapping the live model (and the background copy) drew
    from it too, so a recorded run trained on other masks (final weights 0.055 away)."""
    data = task_dataset(TASK, 48, seed=0)
    dropout = dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    finals = []
    for record in (False, True):
        model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder, **dropout)
        callbacks = [RecorderCallback(tmp_path / "run", probe=PROBE.tokens, every=2, background=background)] if record else []
        transformers.Trainer(model, _arguments(tmp_path / f"trainer{record}"), train_dataset=data,
                             callbacks=callbacks).train()  # fmt: skip
        finals.append(model.state_dict())
    for name, weight in finals[0].items():
        assert torch.equal(weight, finals[1][name]), name


class _StopAt(transformers.TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def test_a_trainer_run_stopped_early_ends_its_recording_with_the_model_it_ends_with(gpt2_folder, tmp_path):
    """A run stopped at step 5 of 8, recorded every 4 steps, has its full records at 0, 4 and 5 (it
    had them at 0 and 4 only: its analyzers read the model of step 4 as the tuned one)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder)
    callback = RecorderCallback(tmp_path / "run", probe=PROBE.tokens, every=4)
    trainer = transformers.Trainer(model, _arguments(tmp_path / "trainer", max_steps=8), callbacks=[callback, _StopAt(5)],
                                   train_dataset=task_dataset(TASK, 96, seed=0))  # fmt: skip
    trainer.train()
    store = RunStore.open(tmp_path / "run")
    assert store.steps == list(range(6)) and store.array_steps("blocks.1.hook_resid_post") == [0, 4, 5]
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert store.scalars()["loss"].loc[1:].tolist() == pytest.approx([e["loss"] for e in logged], rel=1e-4)
    assert store.scalars()["grad_norm"].loc[5] == pytest.approx(logged[-1]["grad_norm"], rel=1e-4)
    assert match_steps(store, wrap_hf_model(model).weights().__getitem__).steps == [5]


def test_a_trainer_that_loads_its_best_checkpoint_at_the_end_can_be_diagnosed_with_its_store(gpt2_folder, tmp_path):
    """Early stopping needs load_best_model_at_end: the Trainer ends with its best checkpoint, not the
    run's last step. Every checkpoint is recorded in full (every=3 does not divide save_steps=2), the
    store says which step the Trainer loaded, and a copy rolled back to it is the model's run."""
    import shutil

    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder)
    callback = RecorderCallback(tmp_path / "run", probe=PROBE.tokens, every=3)
    args = _arguments(tmp_path / "trainer", max_steps=8, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                      save_steps=2, load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=False,
                      learning_rate=3e-2)  # fmt: skip
    trainer = transformers.Trainer(model, args, train_dataset=task_dataset(TASK, 96, seed=0),
                                   eval_dataset=task_dataset(TASK, 16, seed=1), callbacks=[callback])  # fmt: skip
    with pytest.warns(CapwrapWarning, match="the Trainer loaded its best checkpoint"):
        trainer.train()
    store = RunStore.open(tmp_path / "run")
    best = store.meta["best_step"]
    assert best == trainer.state.best_global_step and {2, 4, 6, 8} <= set(store.array_steps("blocks.1.hook_resid_post"))
    ended_with = wrap_hf_model(model)  # the best checkpoint, loaded
    shutil.copytree(tmp_path / "run", tmp_path / "best")
    with RunStore.resume(tmp_path / "best") as copy:
        copy.rollback(best)
    check_store_matches(ModelPair(load_model(gpt2_folder), ended_with), RunStore.open(tmp_path / "best"))
    if best != 8:  # the whole store goes on after the model the Trainer ended with
        with pytest.raises(ConfigError, match=f"had at step {best}, but the store goes on to step 8"):
            check_store_matches(ModelPair(load_model(gpt2_folder), ended_with), store)


def test_a_lora_trainer_run_records_the_merged_weight_changes(gpt2_folder, tmp_path):
    import peft

    base = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM")
    )
    callback = RecorderCallback(tmp_path / "run", probe=PROBE.tokens, hooks=(), every=3)
    args = _arguments(tmp_path / "trainer", learning_rate=1e-2)
    trainer = transformers.Trainer(model, args, train_dataset=task_dataset(TASK, 48, seed=0), callbacks=[callback])
    trainer.train()
    store = RunStore.open(tmp_path / "run")
    assert store.array_steps("weight_delta.head") == [0, 3, 6]
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert store.scalars()["grad_norm"].loc[1:].tolist() == pytest.approx(logged, rel=1e-4)  # the adapter's

    model.save_pretrained(tmp_path / "adapter")
    merged = load_model(gpt2_folder, adapter=tmp_path / "adapter")
    heads = weight_change_table(load_model(gpt2_folder), merged, kinds=("head", "mlp"))
    expected = heads.set_index("component")["change"]
    recorded = store.array("weight_delta.head")[-1].double()
    torch.testing.assert_close(recorded, torch.tensor(expected[store.meta["components"]["head"]].to_numpy()),
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    assert recorded.min() > 0 and float(store.array("weight_delta.mlp")[-1].abs().max()) == 0.0  # only c_attn moved
    # the adapter merged on load is the model the run ended with: the store is taken as its run's
    assert match_steps(store, merged.weights().__getitem__).steps == [6]
    check_store_matches(ModelPair(load_model(gpt2_folder), merged), store)


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_dora_and_ia3_trainer_runs_record_the_merged_weight_changes(method, gpt2_folder, tmp_path):
    """Their merged weights are the base's rescaled (DoRA: each output to its trained magnitude;
    IA3: by the trained vector), so every head of an adapted layer moves, beyond any rank bound;
    the store is the run of the adapter the run saved (both refused until 2026-12-07)."""
    import peft

    config = (
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], use_dora=True, task_type="CAUSAL_LM")
        if method == "dora"
        else peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                            task_type="CAUSAL_LM")  # fmt: skip
    )
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder), config)
    callback = RecorderCallback(tmp_path / "run", probe=PROBE.tokens, hooks=(), every=3)
    args = _arguments(tmp_path / "trainer", learning_rate=1e-2)
    transformers.Trainer(model, args, train_dataset=task_dataset(TASK, 48, seed=0), callbacks=[callback]).train()
    model.save_pretrained(tmp_path / "adapter")
    merged = load_model(gpt2_folder, adapter=tmp_path / "adapter")
    store = RunStore.open(tmp_path / "run")
    assert match_steps(store, merged.weights().__getitem__).steps == [6]
    check_store_matches(ModelPair(load_model(gpt2_folder), merged), store)
    table = weight_change_table(load_model(gpt2_folder), merged, kinds=("head", "mlp")).set_index("component")
    recorded = store.array("weight_delta.head")[-1].double()
    torch.testing.assert_close(recorded, torch.tensor(table.loc[store.meta["components"]["head"], "change"].to_numpy()),
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    assert recorded.min() > 0
    moved_mlp = float(store.array("weight_delta.mlp")[-1].abs().max())
    assert (moved_mlp > 0) == (method == "ia3")  # IA3 scales the MLP's output projection's inputs too


def test_a_lora_run_on_a_bfloat16_base_is_taken_as_the_run_of_its_adapter_merged_in_float32(gpt2_folder, tmp_path):
    """The usual peft setup: the base in bfloat16, so the run's merged weights (and the store's sampled
    values) are bfloat16; the adapter merged on load is float32 (98.6% of the sampled values were
    farther apart than float32's tolerance, and the run's own store was refused)."""
    import peft

    base = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder, dtype=torch.bfloat16)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM")
    )
    callback = RecorderCallback(tmp_path / "run", probe=PROBE.tokens, hooks=(), every=3)
    transformers.Trainer(model, _arguments(tmp_path / "trainer", learning_rate=1e-2), callbacks=[callback],
                         train_dataset=task_dataset(TASK, 48, seed=0)).train()  # fmt: skip
    model.save_pretrained(tmp_path / "adapter")
    merged = load_model(gpt2_folder, adapter=tmp_path / "adapter")  # float32
    store = RunStore.open(tmp_path / "run")
    match = match_steps(store, merged.weights().__getitem__)
    assert match.steps == [6] and match.precision == "bfloat16"
    check_store_matches(ModelPair(load_model(gpt2_folder), merged), store)


def test_a_background_recording_of_a_lora_trainer_run_equals_the_inline_one(gpt2_folder, tmp_path):
    """background=True measures a copy of the merged weights taken at each due step: the same store,
    though training went on while the copy was measured."""
    import peft

    stores = {}
    for background in (False, True):
        base = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder)
        torch.manual_seed(0)  # peft draws the adapter's A from the global generator: the same for both runs
        model = peft.get_peft_model(
            base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM")
        )
        callback = RecorderCallback(tmp_path / f"run{background}", probe=PROBE, hooks="blocks.*.hook_resid_post",
                                    every=2, background=background)  # fmt: skip
        args = _arguments(tmp_path / f"trainer{background}", learning_rate=1e-2)
        transformers.Trainer(model, args, train_dataset=task_dataset(TASK, 48, seed=0), callbacks=[callback]).train()
        stores[background] = RunStore.open(tmp_path / f"run{background}")
    inline, background = stores[False], stores[True]
    assert background.scalars().equals(inline.scalars()) and _layout(background) == _layout(inline)
    for name in inline.array_names:  # the weights' norms to the bit; activations to float32's rounding (the copy is
        # a plain GPT-2 with the merged weights, whose products run through other kernels than the adapter's)
        torch.testing.assert_close(background.array(name), inline.array(name), rtol=1e-6, atol=1e-7, msg=name)
    assert background.array("weight_delta.head")[-1].min() > 0  # the adapter moved every head


def test_an_sft_trainer_run_records(gpt2_folder, tmp_path):
    trl = pytest.importorskip("trl")
    import datasets
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(62)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    gen = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(2, 64, (10,), generator=gen)) for _ in range(32)]
    callback = RecorderCallback(tmp_path / "run", probe=torch.randint(2, 64, (4, 10), generator=gen), every=2)
    config = trl.SFTConfig(str(tmp_path / "sft"), max_steps=4, per_device_train_batch_size=8, max_length=16,
                           report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True, logging_steps=1)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder)
    trainer = trl.SFTTrainer(model, args=config, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                             processing_class=tokenizer, callbacks=[callback])  # fmt: skip
    trainer.train()
    store = RunStore.open(tmp_path / "run")
    assert store.array_steps("blocks.0.hook_resid_post") == [0, 2, 4]
    # The model's own mean token loss; TRL computes and logs the loss itself, normalized by another token count.
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert store.scalars().loc[1:, "loss"].tolist() == pytest.approx(logged, rel=0.15)


def test_recording_a_resumed_trainer_needs_the_store_to_match(gpt2_folder, tmp_path):
    data = task_dataset(TASK, 48, seed=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder)
    args = _arguments(tmp_path / "trainer", max_steps=4, save_strategy="steps", save_steps=2)
    transformers.Trainer(
        model, args, train_dataset=data, callbacks=[RecorderCallback(tmp_path / "run", hooks=())]
    ).train()
    resumed = transformers.Trainer(transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder),
                                   _arguments(tmp_path / "trainer", max_steps=4), train_dataset=data,
                                   callbacks=[RecorderCallback(tmp_path / "run", hooks=())])  # fmt: skip
    with pytest.raises(Exception, match="resumes at step 2 but the store .* ends at step 4; record the resumed run"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "trainer" / "checkpoint-2"))


class _OutOfMemoryOnce(transformers.TrainerCallback):
    """Runs out of memory at the first step, once, as the CPU allocator says it (the message accelerate's
    find_executable_batch_size retries on), after a backward pass would have queued a measurement."""

    def __init__(self, recorder_callback: RecorderCallback, at_step: int = 0):
        self.recorder_callback, self.at_step, self.fired = recorder_callback, at_step, False

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.fired and state.global_step == self.at_step:
            self.fired = True
            self.recorder_callback._measuring = True  # as a backward pass that raised after its first gradient
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")


@pytest.mark.parametrize("fail_at", [0, 2])
def test_a_trainer_that_trains_again_after_running_out_of_memory_goes_on_in_its_store(fail_at, gpt2_folder, tmp_path):
    """auto_find_batch_size retries with a smaller batch, calling on_train_begin again without
    on_train_end: the store goes on (refused as 'already exists' until 2026-12-07), the failed
    attempt's hooks go, and its unfinished measurement does not stop the next ones. The steps an
    attempt ran stay in the weights (transformers restores none): said, and kept in the metadata."""
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder)
    callback = RecorderCallback(tmp_path / "run", probe=PROBE, hooks=(), every=2)
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    args = _arguments(tmp_path / "trainer", max_steps=3, auto_find_batch_size=True, per_device_train_batch_size=16)
    trainer = transformers.Trainer(model, args, train_dataset=task_dataset(TASK, 96, seed=0),
                                   callbacks=[callback, _OutOfMemoryOnce(callback, fail_at)])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(w.message) for w in caught if "after a failed attempt that ran" in str(w.message)]
    assert trainer._train_batch_size < 16  # it did run out of memory once, and retried with a smaller batch
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
    store = RunStore.open(tmp_path / "run")
    if fail_at:
        assert len(said) == 1 and store.meta["retries"] == [{"at_step": 0, "steps_kept_in_the_weights": fail_at}]
    else:
        assert not said and "retries" not in store.meta
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert store.steps == [0, 1, 2, 3]
    assert store.scalars()["grad_norm"].loc[1:].tolist() == pytest.approx([e["grad_norm"] for e in logged], rel=1e-4)


def test_a_trainer_that_trains_again_after_a_refused_start_records(gpt2_folder, tmp_path):
    """A start the callback refused (its folder existed) left the next train() unrecorded, unsaid:
    the refused start had been taken for the same event seen twice."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("in the way")
    callback = RecorderCallback(tmp_path / "run", hooks=())
    trainer = transformers.Trainer(transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder),
                                   _arguments(tmp_path / "trainer", max_steps=2),
                                   train_dataset=task_dataset(TASK, 32, seed=0), callbacks=[callback])  # fmt: skip
    with pytest.raises(StoreError, match="already exists"):
        trainer.train()
    (tmp_path / "run" / "notes.txt").unlink()
    (tmp_path / "run").rmdir()
    trainer.train()
    assert RunStore.open(tmp_path / "run").steps == [0, 1, 2]


def test_a_callback_given_twice_records_each_step_once(gpt2_folder, tmp_path):
    """transformers only warns of a callback given twice and calls it twice per event: the store is
    the one a single callback writes (refused as 'already exists' until 2026-12-07)."""
    data = task_dataset(TASK, 48, seed=0)
    stores = {}
    for copies in (1, 2):
        callback = RecorderCallback(tmp_path / f"run{copies}", probe=PROBE, hooks="blocks.0.hook_resid_post", every=2)
        model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder)
        transformers.Trainer(model, _arguments(tmp_path / "trainer", max_steps=4), train_dataset=data,
                             callbacks=[callback] * copies).train()  # fmt: skip
        stores[copies] = RunStore.open(tmp_path / f"run{copies}")
    assert stores[2].steps == stores[1].steps == [0, 1, 2, 3, 4]
    pd.testing.assert_frame_equal(stores[2].scalars(), stores[1].scalars())
    assert torch.equal(stores[2].array("blocks.0.hook_resid_post"), stores[1].array("blocks.0.hook_resid_post"))


def test_a_trainer_resumed_into_a_new_store_numbers_its_steps_on(gpt2_folder, tmp_path):
    """Resumed from checkpoint-2 into a new folder, the store's steps are the run's (2, 3, 4; they were
    0, 1, 2 until 2026-12-07), measured from the checkpoint's weights, as its metadata says."""
    data = task_dataset(TASK, 48, seed=0)
    args = _arguments(tmp_path / "trainer", max_steps=4, save_strategy="steps", save_steps=2)
    first = transformers.Trainer(transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder), args,
                                 train_dataset=data)  # fmt: skip
    first.train()
    callback = RecorderCallback(tmp_path / "resumed", probe=PROBE, hooks=(), every=2)
    resumed = transformers.Trainer(transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder),
                                   _arguments(tmp_path / "trainer", max_steps=4), train_dataset=data,
                                   callbacks=[callback])  # fmt: skip
    resumed.train(resume_from_checkpoint=str(tmp_path / "trainer" / "checkpoint-2"))
    store = RunStore.open(tmp_path / "resumed")
    assert store.steps == [2, 3, 4] and store.meta["first_step"] == 2
    assert store.array_steps("weight_delta.head") == [2, 4]
    logged = {e["step"]: e["loss"] for e in resumed.state.log_history if "loss" in e}
    assert store.scalars()["loss"].loc[3:].tolist() == pytest.approx([logged[3], logged[4]], rel=1e-4)
    assert store.scalars()["weight_delta"].loc[2] == 0  # the checkpoint's weights are the start


def test_a_trainer_that_computes_the_loss_itself_is_warned_of(gpt2_folder, tmp_path):
    """With label smoothing the Trainer keeps the labels from the model, which returns no loss: the
    callback says it records none (the store silently lacked it until 2026-12-07)."""
    callback = RecorderCallback(tmp_path / "run", hooks=())
    trainer = transformers.Trainer(transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder),
                                   _arguments(tmp_path / "trainer", max_steps=2, label_smoothing_factor=0.1),
                                   train_dataset=task_dataset(TASK, 32, seed=0), callbacks=[callback])  # fmt: skip
    with pytest.warns(CapwrapWarning, match="the model returned no loss, so the store records none") as caught:
        trainer.train()
    assert sum("returned no loss" in str(w.message) for w in caught) == 1  # once per run
    assert "loss" not in RunStore.open(tmp_path / "run").scalars().columns


def test_a_model_in_a_wrapper_of_ones_own_and_a_tokenizer_made_in_memory_record(gpt2_folder, tmp_path):
    """A Trainer given a module of the user's own that holds the model (an AttributeError until
    2026-12-07), with a tokenizer built in memory, which has no name_or_path (a KeyError inside
    TransformerLens until 2026-12-07: the callback no longer hands it the tokenizer, which it does not need)."""
    import tokenizers

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids=None, labels=None, **kwargs):
            return self.inner(input_ids=input_ids, labels=labels, **kwargs)

    words = ["<pad>", "<eos>", "<bos>"] + [f"w{i}" for i in range(61)]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                                     bos_token="<bos>")  # fmt: skip
    inner = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder)
    callback = RecorderCallback(tmp_path / "run", probe=PROBE, hooks="blocks.0.hook_resid_post", every=2)
    trainer = transformers.Trainer(Wrapper(inner), _arguments(tmp_path / "trainer", max_steps=2),
                                   train_dataset=task_dataset(TASK, 32, seed=0), processing_class=tokenizer,
                                   callbacks=[callback])  # fmt: skip
    trainer.train()
    store = RunStore.open(tmp_path / "run")
    assert store.steps == [0, 1, 2] and store.scalars()["loss"].notna().sum() == 2
    heads = weight_change_table(load_model(gpt2_folder), callback.recorder.model, kinds=("head",))
    assert float(heads["change"].sum()) > 0  # the wrapped model's own weights are the ones recorded


def test_the_callback_checks_its_settings_when_made(tmp_path):
    """every=True was taken for one step until the Trainer started."""
    for every in (True, 0, 2.5):
        with pytest.raises(ConfigError, match="every must be a positive number of steps"):
            RecorderCallback(tmp_path / "run", probe=PROBE.tokens, every=every)
