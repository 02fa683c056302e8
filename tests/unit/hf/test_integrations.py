"""RecorderCallback in real Trainer and SFTTrainer runs: the store capwrap.train writes, the run untouched."""

from __future__ import annotations

import pytest
import torch
import transformers

from capwrap.analyzers import weight_change_table
from capwrap.integrations import RecorderCallback, task_dataset
from capwrap.models import load_model
from capwrap.recording import Recorder, RunStore
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


def test_a_callback_that_trains_again_after_a_failed_attempt_leaves_no_hooks_behind(gpt2_folder, tmp_path):
    """A Trainer that retries (auto_find_batch_size after running out of memory) calls on_train_begin
    again without on_train_end: the hooks of the failed attempt go, and a measurement that the failed
    backward pass never ran does not stop the next ones."""
    model = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder)
    callback = RecorderCallback(tmp_path / "run", hooks=(), overwrite=True)
    trainer = transformers.Trainer(model, _arguments(tmp_path / "trainer", max_steps=2),
                                   train_dataset=task_dataset(TASK, 48, seed=0), callbacks=[callback])  # fmt: skip
    state = transformers.TrainerState()
    callback.on_train_begin(trainer.args, state, None, model=model)
    callback._measuring = True  # as a backward pass that raised after its first gradient leaves it
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    trainer.train()
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks - 1  # the attempt's and this run's: gone
    logged = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    assert RunStore.open(tmp_path / "run").scalars()["grad_norm"].loc[1:].tolist() == pytest.approx(logged, rel=1e-4)
