"""capwrap.LoRA: train() fine-tunes a peft adapter; the model holds the merged weights, and the recorder sees them."""

from __future__ import annotations

import pytest
import torch

from capwrap.analyzers import ModelPair, weight_change_table
from capwrap.analyzers.base import check_store_matches
from capwrap.analyzers.weight_diff import change_ranks
from capwrap.errors import ConfigError
from capwrap.methods import LoRA
from capwrap.models import ModelSpec, build_model, load_model, save_model
from capwrap.recording import Recorder, RunStore
from capwrap.tasks import PCFGConfig, PCFGTask
from capwrap.training import TrainConfig, train

TASK = PCFGTask("count", "b", correlation=1.0, config=PCFGConfig(length=8, window=4, occurrence=2))
CONFIG = TrainConfig(steps=8, batch_size=16, lr=1e-2, warmup=0.0, progress=False)


def _base(architecture: str, backend: str | None, tmp_path, **extra):
    extra |= {"n_key_value_heads": 2} if architecture == "llama" else {}
    spec = ModelSpec(d_vocab=TASK.d_vocab, n_ctx=TASK.seq_len, n_layers=2, d_model=16, n_heads=4,
                     architecture=architecture, **extra)  # fmt: skip
    save_model(build_model(spec, seed=0), tmp_path / "base")
    return load_model(tmp_path / "base", backend=backend)


def test_lora_trains_the_merged_model_the_recorder_and_peft_see(backend, tmp_path):
    model = _base("gpt2", backend, tmp_path)
    lora = LoRA(r=2, alpha=4, target=["c_attn", "c_fc"])
    recorder = Recorder(
        model, tmp_path / "run", hooks="blocks.*.hook_resid_post", probe=TASK.sample(8, seed=0), every=4
    )
    result = train(model, TASK, CONFIG, method=lora, recorder=recorder)
    assert result.history["loss"].iloc[-1] < result.history["loss"].iloc[0]
    # the adapter's factors live outside the model: their last gradients are freed too (kept until 2026-12-07)
    assert all(p.grad is None for p in lora._trainable().values())

    base = load_model(tmp_path / "base", backend=backend)
    table = weight_change_table(base, model, kinds=("head", "neuron", "attn", "mlp")).set_index("component")
    assert table.loc["L0H0", "change"] > 0 and table.loc["L1N3", "change"] > 0
    delta = {k: model.weights()[k] - w for k, w in base.weights().items()}
    assert float(delta["blocks.0.attn.W_O"].abs().max()) == 0 and float(delta["blocks.1.mlp.W_out"].abs().max()) == 0
    ranks = change_ranks(delta).set_index("weight")
    assert (ranks["effective_rank"] <= 2 + 1e-3).all()  # rank-2 adapters: rank-2 changes

    store = RunStore.open(tmp_path / "run")
    recorded = store.array("weight_delta.head")[-1].double()
    expected = table.loc[store.meta["components"]["head"], "change"].to_numpy()
    torch.testing.assert_close(recorded, torch.tensor(expected), rtol=1e-4, atol=1e-6)

    lora.save_adapter(tmp_path / "adapter")  # a peft adapter folder that names its base
    merged = load_model(tmp_path / "adapter", backend=backend)
    for name, weight in model.weights().items():
        torch.testing.assert_close(merged.weights()[name], weight, rtol=0, atol=1e-6, msg=name)
    check_store_matches(ModelPair(base, merged), store)  # the saved adapter is the run's last model


def test_lora_state_resumes_the_adapter_exactly(tmp_path):
    model = _base("llama", None, tmp_path)
    lora = LoRA(r=2, target=["q_proj", "v_proj", "down_proj"], rslora=True)
    train(model, TASK, CONFIG, method=lora)
    state = lora.state_dict()
    assert sorted(state) == ["adapter", "base"] and len(state["base"]) == 6
    save_model(model, tmp_path / "tuned")  # a checkpoint holds the merged weights ...

    resumed_model, resumed = (
        load_model(tmp_path / "tuned"),
        LoRA(r=2, target=["q_proj", "v_proj", "down_proj"], rslora=True),
    )
    resumed.setup(resumed_model, TASK, CONFIG)
    resumed.load_state_dict(state)  # ... and the state, the base weights and the adapter
    for name, weight in model.weights().items():
        torch.testing.assert_close(resumed_model.weights()[name], weight, rtol=0, atol=1e-6, msg=name)
    batch = TASK.sample(4, seed=3)
    torch.testing.assert_close(resumed.loss(resumed_model, batch, 0), lora.loss(model, batch, 0))
    with pytest.raises(ConfigError, match="saved for another adapter"):
        other = LoRA(r=2, target=["q_proj"])
        other.setup(resumed_model, TASK, CONFIG)
        other.load_state_dict(state)


def test_dora_trains_the_model_its_saved_adapter_merges_into_and_resumes(tmp_path):
    """LoRA(dora=True): the model holds each adapted weight as peft merges it (its direction
    W0 + scaling·B·A rescaled to the trained magnitudes), which the saved DoRA adapter gives on load
    to the bit; the magnitudes are part of the state a resumed run continues from."""
    model = _base("llama", None, tmp_path)
    dora = LoRA(r=2, target=["q_proj", "v_proj", "down_proj"], dora=True)
    assert dora.describe()["dora"] is True and "dora" not in LoRA(r=2).describe()  # (old checkpoints resume)
    train(model, TASK, CONFIG, method=dora)
    state = dora.state_dict()
    assert sum("lora_magnitude_vector" in name for name in state["adapter"]) == 6

    base = load_model(tmp_path / "base")
    delta = {k: model.weights()[k] - w for k, w in base.weights().items()}
    assert float(delta["blocks.0.attn.W_Q"].abs().max()) > 0 and float(delta["blocks.0.attn.W_K"].abs().max()) == 0
    dora.save_adapter(tmp_path / "adapter")
    merged = load_model(tmp_path / "adapter")
    assert merged.metadata["adapter"]["dora"]
    for name, weight in model.weights().items():
        assert torch.equal(merged.weights()[name], weight), name

    save_model(model, tmp_path / "tuned")
    resumed_model, resumed = load_model(tmp_path / "tuned"), LoRA(r=2, target=["q_proj", "v_proj", "down_proj"], dora=True)
    resumed.setup(resumed_model, TASK, CONFIG)
    resumed.load_state_dict(state)
    batch = TASK.sample(4, seed=3)
    torch.testing.assert_close(resumed.loss(resumed_model, batch, 0), dora.loss(model, batch, 0))


def test_lora_bad_settings(tmp_path):
    for r in (0, True):  # (True passed as rank 1)
        with pytest.raises(ConfigError, match="rank r must be a positive integer"):
            LoRA(r=r)
    with pytest.raises(ConfigError, match=r"LoRA's alpha must be a finite number > 0, got True; twice r is usual"):
        LoRA(alpha=True)
    with pytest.raises(ConfigError, match=r"LoRA's dropout must be a number in \[0, 1\), got 1.0"):
        LoRA(dropout=1.0)
    model = _base("gpt2", None, tmp_path)
    with pytest.raises(ConfigError, match=r"does not fit this gpt2 model .* its layers are \[.*'c_attn'"):
        train(model, TASK, CONFIG, method=LoRA(target=["q_proj"]))
    # the input embedding of a tied model: peft trains it alone (the output layer keeps the base's
    # weights), so the merged tied model would be another model than the trained one (until 2026-12-07)
    with pytest.raises(ConfigError, match=r"adapts transformer.wte.weight, which this model ties to its output layer "
                                          r"\(lm_head.weight\).*target=\['c_attn'\]"):  # fmt: skip
        train(_base("gpt2", None, tmp_path / "tied", tie_embeddings=True), TASK, CONFIG, method=LoRA(target=["c_attn", "wte"]))
    assert LoRA(r=4, target="all-linear").describe() == {
        "method": "lora", "r": 4, "alpha": 16.0, "target": "all-linear", "dropout": 0.0, "rslora": False,
    }  # fmt: skip


def test_a_string_target_is_peft_s_regular_expression_and_the_error_says_so(tmp_path):
    """peft matches a string against full module names (``transformer.h.0.attn.c_attn``): ``"c_attn"``
    matched none, and the error listed ``c_attn`` among the model's layers without saying why."""
    model = _base("gpt2", None, tmp_path)
    with pytest.raises(ConfigError, match=r"a regular expression that peft matches against each module's full name "
                                          r"\('transformer\.h\.0\.attn\.c_attn'\).*give a list: target=\['c_attn'\]"):  # fmt: skip
        train(model, TASK, CONFIG, method=LoRA(target="c_attn"))
    with pytest.raises(ConfigError, match=r"regular expression .* a list of layer names, e\.g\. target=\['c_attn'\]"):
        train(model, TASK, CONFIG, method=LoRA(target="attention"))
    one_step = TrainConfig(steps=1, batch_size=4, progress=False)
    lora = LoRA(r=2, target=r".*\.(c_attn|c_fc)")  # a regular expression still works, as "all-linear" does
    train(model, TASK, one_step, method=lora)
    assert sorted({name.rsplit(".", 1)[-1] for name in lora._layers()}) == ["c_attn", "c_fc"]
    everything = LoRA(r=2, target="all-linear")
    train(model, TASK, one_step, method=everything)
    assert {"c_attn", "c_fc", "c_proj"} <= {name.rsplit(".", 1)[-1] for name in everything._layers()}
