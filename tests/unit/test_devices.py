"""Devices and precision: train(device=, dtype=) with bfloat16 autocast, load_model(dtype=), and accelerate's
device_map / max_memory with disk offload (what a CPU machine can show of models larger than one device)."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch

from capwrap.errors import ConfigError
from capwrap.models import ModelSpec, build_model, load_model, save_model, tl_version
from capwrap.tasks import PCFGConfig, PCFGTask
from capwrap.training import TrainConfig, train

TASK = PCFGTask("count", "a", config=PCFGConfig(length=8, window=4, occurrence=2))
SPEC = ModelSpec(d_vocab=TASK.d_vocab, n_ctx=TASK.seq_len, n_layers=4, d_model=32, n_heads=4, architecture="llama",
                 n_key_value_heads=2)  # fmt: skip
CONFIG = TrainConfig(steps=6, batch_size=16, lr=3e-3, progress=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_model(build_model(SPEC, seed=0), tmp_path_factory.mktemp("devices") / "llama")


def test_bfloat16_training_keeps_weights_and_loss_in_float32(backend, folder):
    model = load_model(folder, backend=backend)
    seen: list[torch.dtype] = []
    with model.hooks([("blocks.1.hook_mlp_out", lambda act, hook: seen.append(act.dtype))]):
        result = train(model, TASK, CONFIG, dtype="bfloat16", device="cpu")
    assert set(seen) == {torch.bfloat16}  # the forward passes ran in bfloat16
    assert model.dtype == torch.float32 and all(w.dtype == torch.float32 for w in model.weights().values())
    reference = load_model(folder, backend=backend)
    expected = train(reference, TASK, CONFIG)
    losses, expected_losses = result.history["loss"], expected.history["loss"]
    assert not losses.equals(expected_losses)
    assert (losses - expected_losses).abs().max() < 0.05 * expected_losses.abs().max()


def test_precision_mistakes_are_refused(folder):
    with pytest.raises(ConfigError, match="float16 needs loss scaling.*bfloat16"):
        train(load_model(folder), TASK, CONFIG, dtype="float16")
    with pytest.raises(ConfigError, match="weights being trained are torch.bfloat16.*Load the model in float32"):
        train(load_model(folder, dtype="bfloat16"), TASK, CONFIG)
    with pytest.raises(ConfigError, match="unknown dtype 'half-ish'"):
        load_model(folder, dtype="half-ish")


def test_load_model_in_bfloat16(backend, folder):
    model = load_model(folder, backend=backend, dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.clone().dtype == torch.bfloat16
    tokens = TASK.sample(4, seed=0).tokens
    torch.testing.assert_close(model(tokens).float(), load_model(folder, backend=backend)(tokens), atol=0.1, rtol=0.05)
    wide = model.clone(dtype="float32")  # a float32 copy (to train), with the bfloat16 model's very weights
    assert wide.dtype == torch.float32 and model.dtype == torch.bfloat16
    assert all(torch.equal(w.float(), model.weights()[k].float()) for k, w in wide.weights().items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_a_placement_on_a_gpu_is_refused_where_there_is_none(folder, capsys):
    """accelerate failed deep inside (a RuntimeError or AssertionError traceback from the CLI)."""
    from capwrap.cli import main

    for placement in ({"device_map": "auto", "max_memory": {0: "1GiB", "cpu": "1GiB"}}, {"device_map": "cuda:0"},
                      {"device_map": {"": 0}}):  # fmt: skip
        with pytest.raises(ConfigError, match=r"the placement names a GPU .* but this machine has no CUDA GPU"):
            load_model(folder, **placement)
    spec = "pcfg=count,operand=a,length=8,window=4,occurrence=2"
    for options in (["--device-map", "auto", "--max-memory", "0=1GiB"], ["--device-map", "cuda:0"]):
        assert main(["diagnose", str(folder), str(folder), "--capability", spec, "--downstream", spec, *options]) == 2
        err = capsys.readouterr().err
        assert "this machine has no CUDA GPU" in err and "Traceback" not in err


@pytest.mark.backend  # each TransformerLens line's bridge adds the unembedding's bias differently
def test_device_map_with_disk_offload_runs_the_model(folder, tmp_path):
    model = load_model(folder, device_map="auto", max_memory={"cpu": "40KB"}, offload_folder=tmp_path / "offload")
    assert model.offloaded and "disk" in model.metadata["device_map"].values()
    whole = load_model(folder, backend="bridge")
    tokens = TASK.sample(8, seed=0).tokens
    torch.testing.assert_close(model(tokens), whole(tokens), atol=1e-5, rtol=1e-5)
    acts = model.capture(tokens, "blocks.*.hook_resid_post")
    torch.testing.assert_close(
        acts["blocks.3.hook_resid_post"], whole.capture(tokens, "blocks.3.hook_resid_post")["blocks.3.hook_resid_post"]
    )
    # the offloaded weights read from the offload folder, once; edits to them reach the forward pass
    weights, reference = model.weights(), whole.weights()
    assert all(torch.equal(w, reference[k]) for k, w in weights.items())
    with torch.no_grad():
        weights["blocks.3.mlp.W_out"][5] += 1.0  # neuron 5 of an offloaded block
        reference["blocks.3.mlp.W_out"][5] += 1.0
    torch.testing.assert_close(model(tokens), whole(tokens), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(tokens), load_model(folder, backend="bridge")(tokens), atol=1e-3)
    with pytest.raises(ConfigError, match="cannot be trained: accelerate offloaded .* to CPU or disk"):
        train(model, TASK, CONFIG)
    with pytest.raises(ConfigError, match="no gradients to read"):
        model.gradients()

    placed = load_model(folder, device_map="cpu")  # everything fits: weights read as usual
    assert not placed.offloaded and torch.equal(
        placed.weights()["blocks.2.mlp.W_in"], whole.weights()["blocks.2.mlp.W_in"]
    )
    with pytest.raises(ConfigError, match="max_memory and offload_folder go with device_map"):
        load_model(folder, max_memory={"cpu": "1GB"})
    with pytest.raises(ConfigError, match="give device or device_map, not both"):
        load_model(folder, device="cpu", device_map="auto")


@pytest.mark.backend  # what each TransformerLens line's bridge does with an offloaded fused projection
@pytest.mark.parametrize(
    ("architecture", "fused"),
    [("gpt2", True), ("phi3", True), ("llama", False)],  # fused q/k/v (Conv1D); q/k/v and gate/up; tied embeddings
)
def test_every_weight_of_a_model_on_disk_is_read_and_edited_as_it_computes(tmp_path, architecture, fused):
    """Every tensor on disk: weights() equals the checkpoint's, and an edit of every weight reaches the
    forward pass — through the copies TransformerLens 4 computes with where it split a fused projection
    (GPT-2's Conv1D c_attn, Phi-3's qkv_proj and gate_up_proj), and through both modules of a tied
    embedding. TransformerLens 3.9 cannot split an offloaded fused projection, and the load says so."""
    spec = ModelSpec(d_vocab=64, n_ctx=16, n_layers=2, d_model=32, n_heads=2, architecture=architecture,
                     tie_embeddings=architecture == "llama")  # fmt: skip
    folder = save_model(build_model(spec, seed=0), tmp_path / architecture)
    load = functools.partial(load_model, folder, device_map="auto", max_memory={"cpu": "1KB"},
                             offload_folder=tmp_path / "offload")  # fmt: skip
    if fused and tl_version() < (4, 0):
        with pytest.raises(ConfigError, match="cannot wrap this model as accelerate placed it.*transformer-lens>=4"):
            load()
        return
    model, whole = load(), load_model(folder, backend="bridge")
    assert model.metadata["device_map"] == {"": "disk"}
    weights, reference = model.weights(), whole.weights()
    assert all(torch.equal(w, reference[k]) for k, w in weights.items())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, w in weights.items():
            change = 0.05 * torch.randn(w.shape, generator=generator)
            w.add_(change)
            reference[name].add_(change)
    tokens = torch.randint(0, 64, (4, 12), generator=generator)
    torch.testing.assert_close(model(tokens), whole(tokens), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model(tokens), load_model(folder, backend="bridge")(tokens), atol=1e-2)


def test_moving_a_model_keeps_the_bridge_views_of_a_fused_projection(backend):
    """nn.Module.to converts parameter by parameter, so the bridge's q/k/v of GPT-2 (views of the fused
    c_attn) would come out as copies, and training or an edit of the weights would reach only one of
    them (seen on a GPU: a model trained after .to("cuda") saved weights it had not computed with).
    A dtype round trip converts the same way on a CPU machine."""
    from capwrap.models.model import keeping_views

    spec = ModelSpec(d_vocab=TASK.d_vocab, n_ctx=TASK.seq_len, n_layers=2, d_model=32, n_heads=4,
                     tie_embeddings=True)  # fmt: skip
    tokens = TASK.sample(4, seed=0).tokens

    def converted(keep: bool):
        model = build_model(spec, backend=backend, seed=0)
        tensors = [*model.module.parameters(), *model.module.buffers(), *model._storage.values()]
        with keeping_views(tensors) if keep else contextlib.nullcontext():
            model.module._apply(lambda t: t.double())
            model.module._apply(lambda t: t.float())
        if keep:  # every weight capwrap reads (a tied W_U = W_E.T too) still lies in a module parameter's memory
            held = {p.untyped_storage().data_ptr() for p in model.module.parameters()}
            assert all(w.untyped_storage().data_ptr() in held for w in model.weights().values())
        before = model(tokens)
        with torch.no_grad():
            model.weights()["blocks.0.attn.W_Q"].mul_(0.0)
        return before, model(tokens)

    reference = build_model(spec, backend=backend, seed=0)(tokens)
    before, after_edit = converted(keep=True)
    torch.testing.assert_close(before, reference)
    assert (after_edit - before).abs().max() > 1e-5  # the forward pass computes with the edited weight
    if backend == "bridge":  # the failure this guards against: without it the edit misses the forward pass
        _, unseen = converted(keep=False)
        assert torch.equal(unseen, before)


def test_keeping_views_refuses_a_conversion():
    from capwrap.models.model import keeping_views

    fused = torch.nn.Parameter(torch.arange(6.0))
    module = torch.nn.ParameterList([fused, torch.nn.Parameter(fused.detach()[3:])])
    with pytest.raises(ConfigError, match="changed dtype"), keeping_views(module.parameters()):
        module.double()


@pytest.mark.slow
def test_capwrap_diagnose_in_bfloat16_measures_what_float32_does(folder, tmp_path, capsys):
    """`capwrap diagnose --dtype bfloat16` loads both models in bfloat16 and every analyzer still
    runs — revival too, which trains a float32 copy of the tuned model (training refuses bfloat16
    weights) — and the statistics stay close to float32's, since probes, metrics and sums are taken
    in float32 (measured: weight diff, attention and patching agree to 0.1%, the probe-based new-latent
    gain, a difference of accuracies near 0, to 0.06)."""
    import json

    from capwrap.cli import main

    base = load_model(folder)  # taught to count a (100% after 300 steps), so every analyzer has a capability to read
    train(base, TASK, TrainConfig(steps=300, batch_size=64, lr=3e-3, progress=False))
    base_folder = save_model(base, tmp_path / "base")
    train(base, PCFGTask("count", "b", correlation=1.0, config=TASK.config), CONFIG)
    tuned_folder = save_model(base, tmp_path / "tuned")
    specs = ["--capability", "pcfg=count,operand=a,length=8,window=4,occurrence=2",
             "--downstream", "pcfg=count,operand=b,correlation=1,length=8,window=4,occurrence=2"]  # fmt: skip
    values = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        argv = ["diagnose", str(base_folder), str(tuned_folder), *specs, "--quick", "--quiet", "--out", str(out)]
        assert main([*argv, "--dtype", dtype]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["dtype"] == dtype and f"dtype='{dtype}'" in summary["provenance"]["call"]
        values[dtype] = {e["analyzer"]: e["value"] for e in summary["evidence"]}
    assert "verdict:" in capsys.readouterr().out
    assert set(values["bfloat16"]) == set(values["float32"]) and len(values["float32"]) >= 6
    for analyzer, value in values["float32"].items():
        low = values["bfloat16"][analyzer]
        if value is None or low is None:
            assert value is low is None, analyzer
            continue
        assert abs(low - value) <= 0.05 * abs(value) + 0.08, (analyzer, value, low)  # measured: at most 0.062
    with pytest.raises(SystemExit):  # argparse refuses a precision it does not offer
        main(["diagnose", str(base_folder), str(tuned_folder), *specs, "--dtype", "float8"])
