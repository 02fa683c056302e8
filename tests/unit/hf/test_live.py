"""wrap_hf_model: a live Hugging Face (or peft) model as a CapModel, sharing its weights, leaving it alone."""

from __future__ import annotations

import pytest
import torch
import transformers

from capwrap.analyzers import weight_change_table
from capwrap.errors import ConfigError
from capwrap.models import load_model, wrap_hf_model
from capwrap.recording import Recorder, RunStore


def test_recorder_takes_a_live_gpt2_and_leaves_its_training_alone(gpt2_folder, tmp_path):
    live = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder).train()
    twin = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder).train()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (live, twin)]
    gen = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 64, (8, 12), generator=gen)
    grad_norms = []  # over the parameters: the tied embedding and unembedding once
    with Recorder(live, tmp_path / "run", hooks="blocks.*.hook_resid_post", probe=probe, every=2) as recorder:
        for _ in range(4):
            tokens = torch.randint(0, 64, (4, 12), generator=gen)
            for model, optimizer in zip((live, twin), optimizers, strict=True):
                loss = model(tokens, labels=tokens).loss
                loss.backward()
                optimizer.step()
            grad_norms.append(float(torch.stack([p.grad.norm() for p in live.parameters()]).norm()))
            recorder.step(loss=loss.item())
            for optimizer in optimizers:
                optimizer.zero_grad()
    for (name, p), q in zip(live.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), f"recording changed how {name} trains"

    store = RunStore.open(tmp_path / "run")
    assert store.array_steps("weight_delta.head") == [0, 2, 4]
    assert live.get_input_embeddings().weight is live.get_output_embeddings().weight
    assert store.scalars()["grad_norm"].loc[1:].tolist() == pytest.approx(grad_norms, rel=1e-5)  # recorded steps too
    start, now = load_model(gpt2_folder), recorder.model
    heads = weight_change_table(start, now, kinds=("head",)).set_index("component")["change"]
    recorded = store.array("weight_delta.head")[-1].double()
    torch.testing.assert_close(
        recorded, torch.tensor(heads[store.meta["components"]["head"]].to_numpy()), rtol=1e-4, atol=1e-6
    )
    assert (store.array("grad_norm.head")[-1] > 0).all()  # GPT-2's fused c_attn gradients are seen
    with torch.no_grad():
        hidden = live.eval()(probe, output_hidden_states=True).hidden_states
    torch.testing.assert_close(store.array("blocks.0.hook_resid_post")[-1], hidden[1], rtol=1e-4, atol=1e-4)


def test_a_live_peft_model_is_seen_merged_and_followed(gpt2_folder, make_adapter, peft_merged):
    import peft

    adapter = make_adapter(gpt2_folder, target_modules=["c_attn", "c_fc"])
    live = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder), adapter, is_trainable=True
    ).eval()
    model = wrap_hf_model(live)
    reference = peft_merged(gpt2_folder, adapter).state_dict()
    for name, tensor in model.checkpoint_state().items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=1e-6, msg=name)

    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for p in live.parameters():
            if p.requires_grad:
                p.mul_(1.5)  # an optimizer step on the adapter
        torch.testing.assert_close(model(tokens), live(tokens).logits, rtol=1e-4, atol=1e-4)
        with live.disable_adapter():
            torch.testing.assert_close(model(tokens), live(tokens).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("options", "unties"),
    [
        ({"target_modules": ["c_attn"]}, False),
        ({"target_modules": ["c_attn", "wte"]}, True),  # LoRA on the embedding: the input side only
        ({"target_modules": ["c_attn"], "modules_to_save": ["wte"]}, True),  # a trained copy of it
        ({"target_modules": ["c_attn"], "modules_to_save": ["lm_head"]}, True),  # a trained copy of the other side
    ],
)
def test_a_live_adapter_that_unties_a_tied_embedding_is_warned_of(gpt2_folder, options, unties):
    """peft trains only the input side of a tied embedding: the live model (run as it computes) no
    longer ties it to the output layer, and its saved adapter will be refused; wrapping it says so."""
    import warnings

    import peft

    from capwrap.errors import CapwrapWarning

    hf = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder).eval()
    assert hf.config.tie_word_embeddings
    live = peft.get_peft_model(hf, peft.LoraConfig(r=2, init_lora_weights=False, **options))
    trains = {name: p.requires_grad for name, p in live.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = wrap_hf_model(live)
    # wrapping trains nothing less (the lm_head copy was frozen: held by the shell, not by the tied storage)
    assert {name: p.requires_grad for name, p in live.named_parameters()} == trains
    said = [str(w.message) for w in caught if issubclass(w.category, CapwrapWarning)]
    assert len(said) == unties
    if unties:
        assert "trains one side of the tied pair transformer.wte.weight / lm_head.weight" in said[0]
        assert "will refuse the saved adapter" in said[0]
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # either way the live model runs as it computes
        torch.testing.assert_close(model(tokens), live(tokens).logits, rtol=1e-4, atol=1e-4)


def test_what_cannot_be_recorded_says_what_can(tmp_path):
    with pytest.raises(
        ConfigError, match="expected a capwrap.CapModel or a Hugging Face causal LM, got Linear.*wrap_hf_model"
    ):
        Recorder(torch.nn.Linear(2, 2), tmp_path / "run", hooks=())
    biogpt = transformers.BioGptForCausalLM(transformers.BioGptConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, intermediate_size=32, num_attention_heads=2))  # fmt: skip
    with pytest.raises(ConfigError, match="model type 'biogpt' .* neither one of capwrap's families — gpt2"):
        wrap_hf_model(biogpt)  # neither a capwrap family nor one TransformerLens's bridge runs
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1,
                                                             ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16))  # fmt: skip
    assert wrap_hf_model(opt).spec.architecture == "opt"  # the bridge runs OPT: the generic path


def test_a_module_of_ones_own_is_searched_for_the_model_that_trains(gpt2_folder):
    """A wrapper (a Trainer's model) holding a student and a frozen teacher: the student is followed;
    two that train are refused, named."""

    class Pair(torch.nn.Module):
        def __init__(self, student, teacher):
            super().__init__()
            self.student, self.teacher = student, teacher

    student = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(gpt2_folder).requires_grad_(False)
    live = wrap_hf_model(Pair(student, teacher))
    with torch.no_grad():
        student.transformer.h[0].attn.c_attn.weight.add_(1.0)
    assert torch.equal(live.weights()["blocks.0.attn.W_Q"], load_model(gpt2_folder).weights()["blocks.0.attn.W_Q"] + 1)
    with pytest.raises(ConfigError, match=r"holds 2 Hugging Face models \(student, teacher\).*wrap_hf_model"):
        wrap_hf_model(Pair(student, teacher.requires_grad_(True)))


def _tiny_live(family: str) -> transformers.PreTrainedModel:
    configs = {
        "gpt_neox": transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=64, max_position_embeddings=32),
        "phi3": transformers.Phi3Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32,
                                        pad_token_id=0),
        "gpt2": transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4),
    }  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(configs[family], attn_implementation="eager").eval()


@pytest.mark.backend  # the bridge's split of a fused projection, on either TransformerLens line
@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
@pytest.mark.parametrize("family", ["gpt_neox", "phi3", "gpt2"])
def test_a_live_model_computes_with_its_weights_as_they_are_now(family, method):
    # GPT-NeoX's per-head query_key_value is computed by the bridge from split copies, not views: a
    # wrapped model kept computing with the weights it had when it was wrapped (logits off by 2.3
    # after an in-place edit, recorded activations off by 0.8 after four Trainer steps). DoRA and IA3
    # (followed since 2026-12-07) on the fused projections: the split copies follow their merged weights.
    import peft

    hf = _tiny_live(family)
    targets = {"gpt_neox": ["query_key_value"], "phi3": ["qkv_proj"], "gpt2": ["c_attn"]}[family]
    config = (
        peft.IA3Config(target_modules=targets, feedforward_modules=[])
        if method == "ia3"
        else peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False, use_dora=method == "dora")
    )
    live = peft.get_peft_model(hf, config)
    model = wrap_hf_model(live)
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, p in live.named_parameters():  # what an optimizer does: every weight, the adapter's too, in place
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        expected = live(tokens).logits
    torch.testing.assert_close(model(tokens), expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        live.disable_adapter_layers()
        expected = live(tokens).logits
    torch.testing.assert_close(model(tokens), expected, rtol=1e-4, atol=1e-4)
