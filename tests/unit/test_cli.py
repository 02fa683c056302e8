"""`capwrap info` and `capwrap diagnose` on checkpoints written to disk, as a user runs them."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import torch

from capwrap.cli import main
from capwrap.models import ModelSpec, build_model, save_model
from capwrap.tasks import Feature, PCFGConfig, PCFGTask, task_from_spec
from capwrap.training import TrainConfig, train

CONFIG = "length=10,window=5,occurrence=2"


@pytest.fixture(scope="module")
def pair_on_disk(tmp_path_factory):
    """A small counting model and a fine-tune of it to count b, saved as checkpoint folders."""
    root = tmp_path_factory.mktemp("pair")
    config = PCFGConfig(length=10, window=5, occurrence=2)
    spec = ModelSpec(d_vocab=PCFGTask(config=config).d_vocab, n_ctx=19, n_layers=2, d_model=32, n_heads=4)
    base = build_model(spec, seed=0)
    train(base, PCFGTask("count", None, prior=(0.5, 0.5, 0.0), config=config),
          TrainConfig(steps=120, batch_size=64, lr=3e-3, progress=False))  # fmt: skip
    tuned = base.clone()
    train(tuned, PCFGTask("count", "b", config=config), TrainConfig(steps=30, batch_size=64, lr=3e-3, progress=False))
    save_model(base, root / "base")
    save_model(tuned, root / "tuned")
    other = build_model(ModelSpec(d_vocab=spec.d_vocab, n_ctx=19, n_layers=2, d_model=32, n_heads=4,
                                  architecture="llama"))  # fmt: skip
    save_model(other, root / "llama")
    return root


def test_info_prints_architecture_and_components(pair_on_disk, capsys):
    assert main(["info", str(pair_on_disk / "base")]) == 0
    out = capsys.readouterr().out
    assert "gpt2" in out and "8 head" in out and "256 neuron" in out
    assert main(["info", str(pair_on_disk / "llama"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["spec"]["architecture"] == "llama" and info["components"]["head"] == 8
    assert info["parameters"] == sum(w.numel() for n, w in build_model(ModelSpec(**info["spec"])).weights().items())


def test_info_names_local_attention_layers(tmp_path, capsys):
    spec = ModelSpec(d_vocab=30, n_ctx=16, n_layers=4, d_model=16, n_heads=2, architecture="gpt_neo",
                     attention_layers=("global", "local") * 2, window_size=8, tie_embeddings=True)  # fmt: skip
    save_model(build_model(spec), tmp_path / "neo")
    assert main(["info", str(tmp_path / "neo")]) == 0
    out = capsys.readouterr().out
    assert "gpt_neo" in out and "local attention (window 8) in layers 1, 3" in out
    assert f"{spec.n_params:,} parameters" in out


def test_info_on_stories260k(stories260k, capsys):
    assert main(["info", str(stories260k), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 260_032  # tied embeddings counted once, as the model card says
    assert info["components"]["kv_head"] == 20 and info["tokenizer"].endswith("(512 tokens)")


def test_diagnose_command_writes_summary_and_report(pair_on_disk, tmp_path, capsys):
    out = tmp_path / "diag"
    code = main(["diagnose", str(pair_on_disk / "base"), str(pair_on_disk / "tuned"),
                 "--capability", f"pcfg=count,operand=a,{CONFIG}", "--downstream", f"pcfg=count,operand=b,{CONFIG}",
                 "--out", str(out), "--quick", "--quiet"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "verdict:" in printed and "revival" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["findings"]) == {"deletion", "creation"}
    assert summary["verdict"] == summary["findings"]["deletion"]["verdict"] or (
        summary["findings"]["deletion"]["verdict"] == "inconclusive"
        and summary["verdict"] == summary["findings"]["creation"]["verdict"]
    )
    assert {e["analyzer"] for e in summary["evidence"]} == {
        "probing",
        "pruning",
        "revival",
        "weight_diff",
        "attention",
        "patching",
        "generalization",
        "new_latent",
    }
    assert summary["capability_spec"].startswith("pcfg=count") and summary["spec"]["n_layers"] == 2
    html = (out / "report.html").read_text()
    assert "Plotly.newPlot" in html and "the capability (deletion question): count a" in html.replace("&#x27;", "'")
    assert f"capwrap diagnosis: {pair_on_disk / 'tuned'} vs {pair_on_disk / 'base'}" in html  # whole paths
    assert summary["resumed"] == [] and len(list((out / "evidence").glob("*.evidence"))) == 8

    # the same command again reads every analyzer's evidence back: the same verdict and numbers
    assert main(["diagnose", str(pair_on_disk / "base"), str(pair_on_disk / "tuned"),
                 "--capability", f"pcfg=count,operand=a,{CONFIG}", "--downstream", f"pcfg=count,operand=b,{CONFIG}",
                 "--out", str(out), "--quick", "--quiet"]) == 0  # fmt: skip
    assert f"resumed: read back the evidence of probing, pruning, revival, weight_diff, attention, patching, " \
           f"generalization, new_latent from {out / 'evidence'}" in capsys.readouterr().out  # fmt: skip
    again = json.loads((out / "summary.json").read_text())
    assert len(again["resumed"]) == 8 and again["evidence"] == summary["evidence"] and again["seconds"] == summary["seconds"]
    assert summary["dtype"] == "float32" and summary["store"] is None
    # the call that reproduces it: every argument given, none left out (store, rule, placement were)
    assert summary["provenance"]["call"] == (
        f"capwrap.diagnosis.diagnose_checkpoints(base={str(pair_on_disk / 'base')!r}, "
        f"tuned={str(pair_on_disk / 'tuned')!r}, capability='pcfg=count,operand=a,{CONFIG}', "
        f"downstream='pcfg=count,operand=b,{CONFIG}', out={str(out)!r}, quick=True)")  # fmt: skip
    assert "was read back from an earlier run of this diagnosis" in (out / "report.html").read_text()
    # another seed into the same folder is refused, not mixed in
    assert main(["diagnose", str(pair_on_disk / "base"), str(pair_on_disk / "tuned"), "--seed", "1",
                 "--capability", f"pcfg=count,operand=a,{CONFIG}", "--downstream", f"pcfg=count,operand=b,{CONFIG}",
                 "--out", str(out), "--quick", "--quiet"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "holds the evidence of another diagnosis: seed differs (0 there, 1 here)" in err and "another --out" in err
    assert "Traceback" not in err
    # --rule weighs with another rule: that is another diagnosis too (a rule file read, not ignored)
    from capwrap.diagnosis.rule import default_rule

    rule = default_rule().to_dict()
    rule["deletion"]["wrapper_threshold"] = 0.3
    (tmp_path / "rule.json").write_text(json.dumps(rule))
    assert main(["diagnose", str(pair_on_disk / "base"), str(pair_on_disk / "tuned"), "--rule", str(tmp_path / "rule.json"),
                 "--capability", f"pcfg=count,operand=a,{CONFIG}", "--downstream", f"pcfg=count,operand=b,{CONFIG}",
                 "--out", str(out), "--quick", "--quiet"]) == 2  # fmt: skip
    shipped = default_rule().to_dict()["deletion"]["wrapper_threshold"]
    assert f"rule.deletion.wrapper_threshold differs ({shipped} there, 0.3 here)" in capsys.readouterr().err


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm", "sigterm --debug"])
def test_diagnose_command_interrupted_keeps_the_finished_evidence(pair_on_disk, tmp_path, capsys, monkeypatch, stop):
    """Ctrl-C, or ``kill`` (SIGTERM, as a scheduler preempting the job sends it), stops a diagnosis with
    the finished analyzers' evidence kept; the exit code tells the two apart (130, 143: SIGTERM exited
    130 until 2026-12-07, read by schedulers as a Ctrl-C)."""
    import signal

    from capwrap.analyzers import AttentionComparison

    out = tmp_path / "diag"
    command = ["diagnose", str(pair_on_disk / "base"), str(pair_on_disk / "tuned"), "--capability",
               f"pcfg=count,operand=a,{CONFIG}", "--downstream", f"pcfg=count,operand=b,{CONFIG}", "--out", str(out),
               "--quick", "--quiet"]  # fmt: skip

    if stop.endswith("--debug"):
        command.append("--debug")

    def interrupted(self, context):  # stopped during the attention comparison
        if stop.startswith("sigterm"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here, at once
        raise KeyboardInterrupt

    handler = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        patch.setattr(AttentionComparison, "analyze", interrupted)
        assert main(command) == (143 if stop.startswith("sigterm") else 130)
    err = capsys.readouterr().err
    assert ("capwrap: terminated (SIGTERM)" if stop.startswith("sigterm") else "capwrap: interrupted") in err
    # --debug shows where it stopped, and still exits 143 (an uncaught KeyboardInterrupt subclass exits 1)
    assert ("Traceback" in err) == stop.endswith("--debug")
    assert signal.getsignal(signal.SIGTERM) is handler  # the command's own handler is gone after it
    assert f"evidence is kept in {out / 'evidence'}; run the same command again to resume" in err
    kept = sorted(p.stem for p in (out / "evidence").glob("*.evidence"))
    assert kept == ["probing", "pruning", "revival", "weight_diff"] and not (out / "summary.json").exists()


def test_diagnose_command_bad_input(pair_on_disk, tmp_path, capsys):
    base, tuned = str(pair_on_disk / "base"), str(pair_on_disk / "tuned")
    cap, down = f"pcfg=count,operand=a,{CONFIG}", f"pcfg=count,operand=b,{CONFIG}"

    def run(*args: str) -> str:
        assert main(["diagnose", *args, "--quick", "--quiet"]) == 2
        return capsys.readouterr().err

    assert "differ in architecture" in run(base, str(pair_on_disk / "llama"), "--capability", cap, "--downstream", down)
    assert "does not exist" in run(base, str(tmp_path / "nowhere"), "--capability", cap, "--downstream", down)
    # a missing folder whose name cannot be a hub name is said to be missing (the hub library answered)
    assert "checkpoint folder no where does not exist" in run(base, "no where", "--capability", cap, "--downstream", down)
    assert "not key=value" in run(base, tuned, "--capability", "count a", "--downstream", down)
    assert "names no task kind" in run(base, tuned, "--capability", "operand=a", "--downstream", down)
    assert "needs the model's tokenizer" in run(
        base, tuned, "--capability", "text=x.txt,feature=word:Lily", "--downstream", down
    )
    # a corrupt safetensors file, and a pickle-only checkpoint
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((pair_on_disk / "tuned" / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "corrupt" in run(base, str(broken), "--capability", cap, "--downstream", down).lower()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((pair_on_disk / "tuned" / "config.json").read_text())
    torch.save({}, pickled / "pytorch_model.bin")
    assert "allow_pickle" in run(base, str(pickled), "--capability", cap, "--downstream", down).replace("-", "_")
    assert "unknown device 'gpu'" in run(base, tuned, "--capability", cap, "--downstream", down, "--device", "gpu")
    if not torch.cuda.is_available():  # a device the machine lacks is refused before anything loads
        err = run(base, tuned, "--capability", cap, "--downstream", down, "--device", "cuda")
        assert "no CUDA GPU" in err and "use device 'cpu'" in err
    # an --out that holds another tool's summary (a demo's): it was replaced, with its report, unsaid
    demo_out = tmp_path / "demo-out"
    demo_out.mkdir()
    (demo_out / "summary.json").write_text(json.dumps({"made_by": "capwrap demo", "verdict": "wrapper"}))
    err = run(base, tuned, "--capability", cap, "--downstream", down, "--out", str(demo_out))
    assert f"{demo_out / 'summary.json'} is not an earlier `capwrap diagnose`'s summary" in err
    assert json.loads((demo_out / "summary.json").read_text())["made_by"] == "capwrap demo"
    (demo_out / "summary.json").unlink()  # a report alone: no diagnosis writes one without its summary
    (demo_out / "report.html").write_text("<html>another tool's</html>")
    err = run(base, tuned, "--capability", cap, "--downstream", down, "--out", str(demo_out))
    assert f"{demo_out / 'report.html'} is not an earlier `capwrap diagnose`'s report" in err
    # an --out that cannot be created fails before the models load (it failed after the evaluation set)
    (tmp_path / "a-file").write_text("x")
    err = run(base, tuned, "--capability", cap, "--downstream", down, "--out", str(tmp_path / "a-file" / "out"))
    assert f"cannot be created: {tmp_path / 'a-file'} is a file" in err


def test_diagnose_command_on_a_tracr_pair(tmp_path, capsys):
    """The paper's own setting from the command line: a Tracr task spec reads its vocabularies from
    BASE (it said the task needed a compiled model), and the compiled model's handful of neurons are
    pruned by single weights (neuron pruning's K would exceed them)."""
    from capwrap.validation.bases import load_base

    base = load_base("tracr-counter")
    tuned = base.clone()
    downstream = "tracr=counter,operand=b,correlation=1"
    train(tuned, task_from_spec(downstream, model=base),
          TrainConfig(steps=30, batch_size=32, lr=1e-2, optimizer="sgd", progress=False))  # fmt: skip
    save_model(base, tmp_path / "base")
    save_model(tuned, tmp_path / "tuned")
    argv = ["diagnose", str(tmp_path / "base"), str(tmp_path / "tuned"), "--capability", "tracr=counter,operand=a",
            "--downstream", downstream, "--quick", "--out", str(tmp_path / "out"), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["tasks"]["capability"]["kind"] == "tracr_counter"
    assert summary["accuracy"]["base"]["capability"] == 1.0 and summary["accuracy"]["tuned"]["capability"] < 0.5
    pruning = {e["analyzer"]: e for e in summary["evidence"]}["pruning"]
    assert "weights by" in pruning["summary"]  # single weights, not neurons
    # fine-tuned 30 SGD steps away from count a, which a few weights bring partly back: a wrapper
    assert summary["findings"]["deletion"]["verdict"] == "wrapper", summary["findings"]["deletion"]["reasons"]
    pcfg = [*argv[:4], "pcfg=count,operand=a", "--downstream", "pcfg=count,operand=b", "--quick",
            "--out", str(tmp_path / "pcfg"), "--quiet"]  # fmt: skip
    capsys.readouterr()
    assert main(pcfg) == 2  # a PCFG task on a compiled model: one clear line
    err = capsys.readouterr().err
    assert "capwrap: error: task 'count a' uses 45 token ids but the model embeds only 11" in err
    # the fix a checkpoint's user can take (until 2026-12-07: "build the model with d_vocab >= 45")
    assert "reads only its program's vocabulary: give Tracr tasks (command line: tracr=counter,operand=b" in err
    assert "d_vocab" not in err


def test_diagnose_refuses_pairs_with_different_tokenizers(stories260k, tmp_path):
    from transformers import AutoTokenizer

    from capwrap.analyzers import ModelPair
    from capwrap.diagnosis import check_same_tokenizer
    from capwrap.errors import ConfigError
    from capwrap.models import load_model

    base = load_model(stories260k)
    other = load_model(stories260k)
    tok = AutoTokenizer.from_pretrained(stories260k)
    a, b = tok.convert_ids_to_tokens([300, 301])
    tok.add_tokens(["<extra_token>"])  # beyond the model's 512 rows: no model of the pair reads it
    check_same_tokenizer(base, other)
    other.tokenizer = tok
    check_same_tokenizer(base, other)  # (refused until 2026-12-08: a fine-tune's added chat tokens never pair)
    renumbered = tmp_path / "renumbered"
    shutil.copytree(stories260k, renumbered)
    data = json.loads((renumbered / "tokenizer.json").read_text())
    data["model"]["vocab"][a], data["model"]["vocab"][b] = 301, 300  # two of the model's ids swap their tokens
    (renumbered / "tokenizer.json").write_text(json.dumps(data))
    (renumbered / "tok512.model").unlink()  # (the slow tokenizer's file would be read first)
    other.tokenizer = AutoTokenizer.from_pretrained(renumbered)
    assert other.tokenizer.convert_tokens_to_ids(a) == 301
    with pytest.raises(ConfigError, match=r"different tokenizers \(512 vs 512 tokens, 4 entries differ"):
        check_same_tokenizer(base, other)
    with pytest.raises(ConfigError, match="different tokenizers"):  # every pair an analyzer or diagnose() is given
        ModelPair(base, other)


def test_version_and_the_help_that_cannot_go_stale(capsys):
    from importlib.metadata import version

    from capwrap.models import available_backends
    from capwrap.tasks.spec import _PCFG_KEYS, _TEXT_KEYS, SPEC_EXAMPLES
    from capwrap.tasks.text import FEATURE_KINDS

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert f"TransformerLens {version('transformer-lens')}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["diagnose", "--help"])
    text = capsys.readouterr().out
    assert all(key in text for key in _PCFG_KEYS | _TEXT_KEYS)
    assert all(example in text for example, _ in FEATURE_KINDS.values())
    assert all(example in text for examples in SPEC_EXAMPLES.values() for example in examples)
    assert "--debug" in text and "--quiet" in text
    assert "{" + ",".join(available_backends()) + "}" in text  # only the installed TL's backends
    for example in SPEC_EXAMPLES["pcfg"]:  # the examples parse
        task_from_spec(example)
    for example, _ in FEATURE_KINDS.values():
        Feature.parse(example)


def test_quiet_silences_the_progress_bars_of_datasets(stories260k, tmp_path, capsys):
    import datasets

    texts = tmp_path / "lily.txt"
    texts.write_text("Lily went home.\n\nLily had a dog.\n\nThe cat sat with Lily.\n")
    argv = [
        "diagnose",
        str(stories260k),
        str(stories260k),
        "--capability",
        f"text={texts},feature=word:Lily",
        "--downstream",
        f"text={texts},without=word:Lily",
    ]  # fmt: skip  (every text mentions Lily: an error)
    assert main(argv) == 2
    assert "Filter" in capsys.readouterr().err  # without --quiet the bars are there
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Filter" not in err and err.count("\n") == 1 and "every text contains word:Lily" in err
    assert datasets.is_progress_bar_enabled()  # switched back on after the command


def test_busy_cores_sees_another_process():
    import subprocess
    import sys

    import capwrap.cli as cli

    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert cli.busy_cores(0.5) >= 0.7  # one core kept busy by the other process
    finally:
        burner.kill()
        burner.wait()


def test_threads_option_sets_torch_threads_for_the_command_only(pair_on_disk, capsys, monkeypatch):
    import capwrap.cli as cli

    before, seen, info = torch.get_num_threads(), [], cli._info
    monkeypatch.setattr(cli, "_info", lambda args: seen.append(torch.get_num_threads()) or info(args))
    assert main(["info", str(pair_on_disk / "base"), "--threads", "1"]) == 0
    assert seen == [1] and torch.get_num_threads() == before
    assert 1 <= cli.default_threads() <= (os.cpu_count() or 1)
    with pytest.raises(SystemExit):
        main(["info", str(pair_on_disk / "base"), "--threads", "0"])
    assert "positive whole number" in capsys.readouterr().err


def test_demo_without_diagnosis_prints_no_verdict(tmp_path, capsys):
    """`capwrap demo --no-diagnose` printed `verdict: None`."""
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "2", "--eval-size", "16", "--no-diagnose", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "verdict" not in out and "done in" in out
    assert json.loads((tmp_path / "demo" / "summary.json").read_text())["verdict"] is None


def test_a_demo_stopped_on_the_way_leaves_no_earlier_demos_outputs_beside_its_run(tmp_path, capsys):
    """A demo run again into one folder, stopped while it fine-tunes, left the earlier demo's summary,
    report and tuned model beside its own partial run (until 2026-12-07): they go as it starts."""
    from capwrap import run_demo

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2", "--eval-size", "16", "--no-diagnose", "--quiet"]) == 0
    assert {"summary.json", "report.html", "tuned", "run"} <= {p.name for p in out.iterdir()}

    def stop_at_fine_tuning(line: str) -> None:
        if line.startswith("fine-tuning"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_demo(out, finetune_steps=2, eval_size=16, diagnose_pair=False, progress=False, log=stop_at_fine_tuning)
    assert not {"summary.json", "report.html", "tuned"} & {p.name for p in out.iterdir()}


def test_an_interrupted_validate_says_its_finished_records_are_kept(tmp_path, capsys, monkeypatch):
    import capwrap.validation
    from capwrap.files import write_json_atomic
    from capwrap.validation.runner import record_path

    def interrupted(chosen, out, **kwargs):  # one scenario finished, then Ctrl-C
        write_json_atomic(record_path(out, chosen[0]), {"scenario": chosen[0].to_dict()})
        raise KeyboardInterrupt

    monkeypatch.setattr(capwrap.validation, "run_suite", interrupted)
    assert main(["validate", "--scenario", "held/kept/*", "--out", str(tmp_path), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert f"the records of 1 finished scenario are kept in {tmp_path / 'scenarios'}; run the same command again" in err
