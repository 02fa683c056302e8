"""Streaming weight diff: the same table as the in-memory one, from files, one layer at a time."""

from __future__ import annotations

import pytest
import torch

from capwrap.analyzers import weight_change_table
from capwrap.analyzers.streaming import stream_weight_change
from capwrap.errors import CheckpointError, ConfigError
from capwrap.models import ModelSpec, build_model, save_model


def _pair(architecture: str, tie: bool = False):
    extra = {"n_key_value_heads": 2} if architecture == "llama" else {}
    spec = ModelSpec(d_vocab=24, n_ctx=16, n_layers=3, d_model=16, n_heads=4, architecture=architecture,
                     tie_embeddings=tie, **extra)  # fmt: skip
    base = build_model(spec, seed=0)
    tuned = base.clone()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, w in tuned.weights().items():
            scale = 0.2 if name.startswith("blocks.1.") else 0.01
            w.add_(scale * torch.randn(w.shape, generator=gen))
    return base, tuned


@pytest.mark.parametrize(
    ("architecture", "tie"), [("gpt2", True), ("gpt_neo", True), ("llama", False), ("llama", True)]
)
def test_streamed_table_equals_the_in_memory_table(architecture, tie, tmp_path):
    base, tuned = _pair(architecture, tie)
    save_model(base, tmp_path / "base")
    save_model(tuned, tmp_path / "tuned")
    streamed = stream_weight_change(tmp_path / "base", tmp_path / "tuned").set_index("component").sort_index()
    expected = weight_change_table(base, tuned).set_index("component").sort_index()
    assert list(streamed.index) == list(expected.index)
    torch.testing.assert_close(torch.tensor(streamed["change"].to_numpy()), torch.tensor(expected["change"].to_numpy()),
                               rtol=1e-5, atol=1e-7)  # fmt: skip
    assert streamed.loc["L1.mlp", "change"] > 5 * streamed.loc["L0.mlp", "change"]  # layer 1 moved most


def test_sharded_checkpoints_stream_too(tmp_path):
    base, tuned = _pair("llama")
    save_model(base, tmp_path / "base")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(tuned.spec.to_hf_config())
    hf.load_state_dict(tuned.checkpoint_state())
    hf.save_pretrained(tmp_path / "tuned", max_shard_size="20KB")  # several files and an index
    assert len(list((tmp_path / "tuned").glob("model-*.safetensors"))) > 1
    streamed = stream_weight_change(tmp_path / "base", tmp_path / "tuned").set_index("component")
    expected = weight_change_table(base, tuned).set_index("component")
    assert abs(streamed.loc["L1.attn", "change"] - expected.loc["L1.attn", "change"]) < 1e-5


def test_streaming_bad_input(tmp_path):
    base, tuned = _pair("gpt2")
    save_model(base, tmp_path / "base")
    other = build_model(ModelSpec(d_vocab=24, n_ctx=16, n_layers=2, d_model=16, n_heads=4))
    save_model(other, tmp_path / "other")
    with pytest.raises(ConfigError, match="n_layers"):
        stream_weight_change(tmp_path / "base", tmp_path / "other")
    with pytest.raises(CheckpointError, match="does not exist"):
        stream_weight_change(tmp_path / "base", tmp_path / "nowhere")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle"):
        stream_weight_change(tmp_path / "base", pickled)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tmp_path / "base" / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        stream_weight_change(tmp_path / "base", broken)


def test_older_checkpoint_names_stream_too(tmp_path):
    """The hub's gpt2 stores ``h.0.attn.c_attn.weight`` (no ``transformer.`` prefix) and its causal
    masks; a fine-tune saved by transformers has the prefix. The pair still streams."""
    from safetensors.torch import load_file, save_file

    base, tuned = _pair("gpt2", tie=True)
    save_model(base, tmp_path / "base")
    save_model(tuned, tmp_path / "tuned")
    stored = load_file(tmp_path / "base" / "model.safetensors")
    bare = {k.removeprefix("transformer."): v for k, v in stored.items()}
    bare |= {f"h.{i}.attn.bias": torch.ones(1, 1, 16, 16) for i in range(3)}
    save_file(bare, tmp_path / "base" / "model.safetensors")
    streamed = stream_weight_change(tmp_path / "base", tmp_path / "tuned").set_index("component")
    expected = weight_change_table(base, tuned).set_index("component")
    assert abs(streamed.loc["L1.attn", "change"] - expected.loc["L1.attn", "change"]) < 1e-5


@pytest.mark.parametrize("tie", [False, True])
def test_streamed_headline_and_ranks_equal_the_in_memory_ones(tie, tmp_path):
    from capwrap.analyzers.streaming import stream_weight_diff
    from capwrap.analyzers.weight_diff import change_ranks, change_summary
    from capwrap.models.layouts import one_name_per_tensor

    base, tuned = _pair("llama", tie)
    save_model(base, tmp_path / "base")
    save_model(tuned, tmp_path / "tuned")
    streamed = stream_weight_diff(tmp_path / "base", tmp_path / "tuned")
    wb, wt = base.weights(), tuned.weights()
    # the whole change at once, in memory, each tensor once (a tied unembedding is a view of the embedding)
    delta = {k: (wt[k] - wb[k]).detach() for k in one_name_per_tensor(wb)}
    assert len(delta) == len(wb) - tie
    ranks = change_ranks(delta)
    expected = change_summary(
        weight_change_table(base, tuned), ranks, sum(float(d.square().sum()) for d in delta.values())
    )
    for key, value in expected.items():
        assert streamed.headline[key] == pytest.approx(value, rel=1e-5), key
    merged = streamed.ranks.merge(ranks, on="weight", suffixes=("", "_memory"))
    assert len(merged) == len(ranks) > 0
    torch.testing.assert_close(torch.tensor(merged["effective_rank"].to_numpy()),
                               torch.tensor(merged["effective_rank_memory"].to_numpy()), rtol=1e-4, atol=1e-4)  # fmt: skip
    assert 0 < streamed.headline["top10pct_share"] <= 1
