"""Every bad input in the docs' table (docs/guide/bad-inputs.md) gets the clear error the table says.

Each case is a row of that table, by id: an API call that must raise the given error with a message
matching a pattern, or a command line that must print one line ``capwrap: error: ...`` and exit
with code 2, never a traceback. ``test_the_docs_table_lists_exactly_these_cases`` keeps the two in
step.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from capwrap.analyzers import Context, ModelPair, WeightDiff
from capwrap.cli import main
from capwrap.diagnosis import diagnose
from capwrap.diagnosis.rule import VerdictRule, default_rule
from capwrap.errors import CheckpointError, ConfigError, HookNameError, StoreError
from capwrap.methods import FineTune, GradientAscent
from capwrap.models import ModelSpec, available_backends, build_model, load_model, save_model
from capwrap.recording import Recorder, RunStore
from capwrap.tasks import Feature, PCFGConfig, PCFGTask, TaskBatch, load_texts, task_from_spec
from capwrap.training import TrainConfig, train

DOCS = Path(__file__).resolve().parents[2] / "docs" / "guide" / "bad-inputs.md"
TRACR_COUNTER = Path(__file__).resolve().parents[2] / "capwrap" / "assets" / "suite" / "tracr-counter"
PCFG = PCFGConfig(length=8, window=4, occurrence=2)
TASK = PCFGTask("count", "a", config=PCFG)
SPEC = ModelSpec(d_vocab=TASK.d_vocab, n_ctx=TASK.seq_len, n_layers=1, d_model=16, n_heads=2)
CAP, DOWN = "pcfg=count,operand=a,length=8,window=4,occurrence=2", "pcfg=count,operand=b,length=8,window=4,occurrence=2"


class Env:
    """Files on disk the cases use: checkpoints good and bad, a recorded run, a plain file."""

    def __init__(self, root: Path):
        self.root = root
        self.model = build_model(SPEC, seed=0)
        self.ckpt = save_model(self.model, root / "ckpt")
        self.file = root / "a_file.txt"
        self.file.write_text("not a folder")
        self.nan_ckpt = self._broken("nan", weights=self._nan_weights())
        self.tensor_missing = self._broken("tensor_missing", weights=self._weights_without("transformer.h.0.mlp.c_fc.bias"))
        self.no_config = self._broken("no_config", config=None)
        self.bad_config = self._broken("bad_config", config="{not json")
        self.truncated = self._broken("truncated", weights=b"garbage")
        self.pickled = self._broken("pickled", weights=None)
        torch.save({}, self.pickled / "pytorch_model.bin")
        self.plain_store = root / "plain_run"
        model = build_model(SPEC, seed=0)
        train(
            model,
            TASK,
            TrainConfig(steps=1, batch_size=4, progress=False),
            recorder=Recorder(model, self.plain_store, hooks=()),
        )
        self.checkpointed = root / "checkpointed_run"
        model = build_model(SPEC, seed=0)
        train(model, TASK, TrainConfig(steps=2, batch_size=4, progress=False, checkpoint_every=1),
              recorder=Recorder(model, self.checkpointed, hooks=()))  # fmt: skip
        self.csv = root / "texts.csv"
        self.csv.write_text("story\nOnce upon a time.\n")
        self.ids = root / "ids.jsonl"
        self.ids.write_text('{"id": 1, "story": "Once upon a time."}\n')
        self.markdown = root / "stories.md"
        self.markdown.write_text("# Once upon a time\n")

    def _weights_without(self, name: str) -> bytes:
        from safetensors.torch import save

        state = self.model.checkpoint_state()
        del state[name]
        return save(state)

    def _nan_weights(self) -> bytes:
        from safetensors.torch import save

        state = self.model.checkpoint_state()
        state["transformer.h.0.mlp.c_fc.weight"][3, 5] = float("nan")
        return save(state)

    def _broken(self, name: str, config: str | None | bool = True, weights: bytes | None | bool = True) -> Path:
        folder = self.root / name
        folder.mkdir()
        if config is True:
            config = (self.ckpt / "config.json").read_text()
        if config is not None:
            (folder / "config.json").write_text(config)
        if weights is True:
            weights = (self.ckpt / "model.safetensors").read_bytes()
        if weights is not None:
            (folder / "model.safetensors").write_bytes(weights)
        return folder

    def diagnose_into_another_pairs_evidence(self):
        """A diagnosis of one pair keeps its evidence; a second pair diagnosed into the same folder."""
        from capwrap.analyzers import Generalization

        folder = self.root / "evidence-of-one-pair"
        for tuned in (self.model, build_model(SPEC, seed=1)):
            diagnose(self.model, tuned, TASK, TASK, analyzers=[Generalization()], eval_size=16, progress=False,
                     evidence_dir=folder)  # fmt: skip

    def folder_with_a_tuned_model_of_ones_own(self) -> Path:
        """A folder whose ``tuned/`` holds a fine-tuned model and notes a demo did not write (the demo
        deleted them until 2026-12-07)."""
        folder = self.root / "mine"
        if not folder.exists():
            save_model(self.model, folder / "tuned", metadata={"task": "count b", "train_config": {"steps": 300}})
            (folder / "tuned" / "notes.txt").write_text("mine")
        return folder

    def diagnosis_folder(self) -> Path:
        """A folder holding what `capwrap diagnose --out` writes (the demo deleted its summary and
        report until 2026-12-07)."""
        folder = self.root / "a_diagnosis"
        folder.mkdir(exist_ok=True)
        (folder / "summary.json").write_text('{"verdict": "wrapper"}')
        (folder / "report.html").write_text("<html></html>")
        return folder

    def adapter(self, config: str) -> Path:
        """An adapter folder whose ``adapter_config.json`` holds ``config``."""
        folder = self.root / f"adapter-{abs(hash(config))}"
        folder.mkdir(exist_ok=True)
        (folder / "adapter_config.json").write_text(config)
        return folder

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def config_of_other_width(self) -> Path:
        """A checkpoint whose config.json was edited to another width than its weights' (a traceback
        from transformers 5 until 2026-12-07)."""
        import json

        config = json.loads((self.ckpt / "config.json").read_text())
        return self._broken("other_width", config=json.dumps({**config, "n_embd": 2 * config["n_embd"]}))

    def store_without_a_step(self) -> Path:
        """A run store whose first step line was cut (the recording stopped before it was written)."""
        folder = self.root / "stepless_run"
        if not folder.exists():
            import shutil

            shutil.copytree(self.plain_store, folder)
            (folder / "steps.jsonl").write_text('{"step": 0, "scal')
        return folder

    def store_not_a_recording(self) -> Path:
        """A run store written without a Recorder: per-step data of one's own, no model spec."""
        folder = self.root / "own_data_run"
        if not folder.exists():
            with RunStore.create(folder, meta={"lr": 1e-3}) as store:
                store.append(0, scalars={"loss": 1.0})
        return folder

    def store_with_a_cut_array(self) -> Path:
        """A copy of the recorded run whose ``weight_delta.head`` file lost its last bytes (an incomplete copy)."""
        folder = self.root / "cut_array_run"
        if not folder.exists():
            import shutil

            shutil.copytree(self.plain_store, folder)
            array = folder / "arrays" / RunStore.open(folder)._arrays["weight_delta.head"]["file"]
            array.write_bytes(array.read_bytes()[:-4])
        return folder

    def load_relative(self, name: str):
        """``load_model(name)`` from the cases' folder, as a user types a path relative to where they are."""
        import contextlib

        with contextlib.chdir(self.root):
            return load_model(name)

    def circuit(self):
        from capwrap.circuits import Circuit, Graph

        return Circuit.from_edges(Graph.from_spec(SPEC), ["L0H0->logits"])

    def partial_circuit_file(self):
        """A JSON file that says it is a circuit and holds nothing else."""
        import json

        from capwrap.circuits import Circuit

        path = self.root / "partial_circuit.json"
        path.write_text(json.dumps({"format": json.loads(self.circuit().save(self.root / "c.json").read_text())["format"]}))
        return Circuit.load(path)

    def partial_scores(self):
        """Exact scores of two edges only (the rest NaN)."""
        from capwrap.circuits import exact_scores

        return exact_scores(self.model, TASK.sample(4, seed=0), edges=[0, 1])

    def faithfulness_past_partial_scores(self):
        """Exact scores of two edges only (the rest NaN), asked for a circuit of five."""
        from capwrap.circuits import exact_scores, faithfulness

        batch = TASK.sample(4, seed=0)
        return faithfulness(self.model, batch, exact_scores(self.model, batch, edges=[0, 1]), ns=[5])

    def model_with_nan_row(self):
        """A NaN in the embedding of a token the task never uses."""
        model = build_model(ModelSpec(d_vocab=SPEC.d_vocab + 4, n_ctx=SPEC.n_ctx, n_layers=1, d_model=16, n_heads=2))
        with torch.no_grad():
            model.weights()["embed.W_E"][-1, 0] = float("nan")
        return model


def _logprob(logits, batch):
    from capwrap.circuits import answer_logprob

    return answer_logprob(logits, batch)


def _attribute(env: Env, n: int = 4, **kwargs):
    from capwrap.circuits import attribute

    return attribute(env.model, TASK.sample(n, seed=0), **kwargs)


@dataclass
class Case:
    """One row of the table: ``run(env)`` must raise ``error`` matching ``match`` (API), or, for a
    command line (``argv``), exit 2 with one line matching ``match``."""

    id: str
    error: type[BaseException] | None
    match: str
    run: Callable[[Env], Any] | None = None
    argv: Callable[[Env], list[str]] | None = None


def _unavailable_backend() -> str:
    return next((b for b in ("hooked", "bridge") if b not in available_backends()), "nonsense")


def _in_a_new_store(env: Env, name: str, act: Callable[[RunStore], Any]) -> Any:
    """``act(store)`` on a new store that this process appends to, closed afterwards."""
    with RunStore.create(env.root / name, overwrite=True) as store:
        return act(store)


CASES = [
    # models and checkpoints
    Case("load-missing-folder", CheckpointError, "does not exist", lambda e: load_model(e.root / "nowhere")),
    Case(
        "load-missing-relative-folder",
        CheckpointError,
        "checkpoint folder ckpt/nowhere does not exist",
        lambda e: e.load_relative("ckpt/nowhere"),
    ),
    Case("load-file-not-folder", CheckpointError, "is a file", lambda e: load_model(e.file)),
    Case(
        "load-max-memory-a-string",
        ConfigError,
        "max_memory must be a dict of device to size",
        lambda e: load_model(e.ckpt, device_map="auto", max_memory="cpu=1GB"),
    ),
    Case("load-no-config", CheckpointError, "no config.json", lambda e: load_model(e.no_config)),
    Case("load-config-not-json", OSError, "config", lambda e: load_model(e.bad_config)),
    Case("load-truncated-weights", CheckpointError, "corrupt", lambda e: load_model(e.truncated)),
    Case("load-pickle-only", CheckpointError, "allow_pickle", lambda e: load_model(e.pickled)),
    Case(
        "load-nan-weight",
        CheckpointError,
        r"non-finite values in transformer\.h\.0\.mlp\.c_fc\.weight \(1 NaN",
        lambda e: load_model(e.nan_ckpt),
    ),  # fmt: skip
    Case("save-existing-folder", CheckpointError, "already exists", lambda e: save_model(e.model, e.ckpt)),
    Case(
        "spec-bad-heads",
        ConfigError,
        "not divisible by n_heads",
        lambda e: ModelSpec(d_vocab=9, n_ctx=8, d_model=16, n_heads=3),
    ),  # fmt: skip
    Case("forward-float-tokens", ConfigError, "integer token ids", lambda e: e.model(torch.rand(2, 5))),
    Case(
        "forward-1d-tokens", ConfigError, r"shape \[batch, pos\]", lambda e: e.model(torch.zeros(5, dtype=torch.long))
    ),
    Case("forward-too-long", ConfigError, "n_ctx", lambda e: e.model(torch.zeros(1, SPEC.n_ctx + 1, dtype=torch.long))),
    Case("forward-out-of-vocab", ConfigError, "embeds only", lambda e: e.model(torch.full((1, 3), SPEC.d_vocab))),
    Case("forward-negative-token", ConfigError, "token ids are never negative", lambda e: e.model(torch.full((1, 3), -1))),
    Case(
        "hooks-unknown",
        HookNameError,
        "closest valid names",
        lambda e: e.model.capture(TASK.sample(2, seed=0).tokens, "blocks.*.resid_post"),
    ),  # fmt: skip
    # tasks
    Case(
        "batch-float-answers",
        ConfigError,
        "answers must be an integer tensor of shape \\[2\\]",
        lambda e: TaskBatch(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long), torch.zeros(2)),
    ),  # fmt: skip
    Case(
        "batch-label-length",
        ConfigError,
        r"labels\['count_a'\] must be a tensor of shape \[2\]",
        lambda e: TaskBatch(
            torch.zeros(2, 3, dtype=torch.long), *[torch.zeros(2, dtype=torch.long)] * 2, {"count_a": torch.zeros(3)}
        ),
    ),  # fmt: skip
    Case("pcfg-bad-operand", ConfigError, "operand", lambda e: PCFGTask("count", "q", config=PCFG)),
    Case("pcfg-negative-seed", ConfigError, "seed must be a non-negative integer", lambda e: TASK.sample(2, seed=-1)),
    Case("spec-not-key-value", ConfigError, "not key=value", lambda e: task_from_spec("count a")),
    Case("spec-unknown-key", ConfigError, "unknown keys \\['colour'\\]", lambda e: task_from_spec(f"{CAP},colour=red")),
    Case("spec-repeated-key", ConfigError, "gives 'operand' twice", lambda e: task_from_spec(f"{CAP},operand=b")),
    Case(
        "spec-split-of-a-local-file",
        ConfigError,
        "picks a split of a hub dataset, but .* is a local file",
        lambda e: task_from_spec(f"text={e.ids},field=story,split=validation", tokenizer=object()),
    ),
    Case("feature-bad-kind", ConfigError, "unknown feature kind", lambda e: Feature.parse("colour:red")),
    Case("feature-bad-regex", ConfigError, "regular expression", lambda e: Feature.parse("regex:(")),
    Case("texts-missing-file", ConfigError, "no such file", lambda e: load_texts(e.root / "nope.txt")),
    Case("texts-missing-column", ConfigError, "no column 'text'", lambda e: load_texts(e.csv)),
    Case(
        "texts-column-not-text",
        ConfigError,
        r"the column 'id' of .*ids.jsonl holds int64 values, not text",
        lambda e: load_texts(e.ids, field="id"),
    ),
    Case("texts-unknown-file-kind", ConfigError, "not a kind of file capwrap reads", lambda e: load_texts(e.markdown)),
    Case("texts-negative-limit", ConfigError, "limit must be a positive", lambda e: load_texts(e.ids, field="story", limit=-5)),
    # training
    Case(
        "train-nan-weight",
        ConfigError,
        r"^the model to train holds non-finite values in embed\.W_E \(1 NaN",
        lambda e: train(e.model_with_nan_row(), TASK, TrainConfig(steps=1, progress=False)),
    ),  # fmt: skip
    Case("train-bad-lr", ConfigError, "lr must be a positive", lambda e: TrainConfig(lr=0)),
    Case(
        "train-momentum-out-of-range",
        ConfigError,
        r"TrainConfig\.momentum \(SGD's momentum\) must be a number in \[0, 1\), got 1\.5; 0\.9 is usual",
        lambda e: TrainConfig(optimizer="sgd", momentum=1.5),
    ),
    Case(
        "train-config-a-dict",
        ConfigError,
        r"config must be a capwrap.TrainConfig, got dict: pass TrainConfig\(\*\*\{'steps': 1\}\)",
        lambda e: train(e.model, TASK, {"steps": 1}),
    ),  # fmt: skip
    Case(
        "train-method-not-a-method",
        ConfigError,
        "TrainingMethod",
        lambda e: train(e.model, TASK, TrainConfig(steps=1, progress=False), method="npo"),
    ),  # fmt: skip
    Case("train-retain-weight-nan", ConfigError, r"GradientAscent's retain_weight .* must be a finite number >= 0",
         lambda e: GradientAscent(retain_weight=float("nan"))),
    Case(
        "train-recorder-of-another-model",
        ConfigError,
        "another model",
        lambda e: train(
            e.model.clone(),
            TASK,
            TrainConfig(steps=1, progress=False),
            recorder=Recorder(e.model, e.root / "r1", hooks=()),
        ),
    ),  # fmt: skip
    Case(
        "train-checkpoint-without-recorder",
        ConfigError,
        "needs a recorder",
        lambda e: train(e.model, TASK, TrainConfig(steps=1, progress=False, checkpoint_every=1)),
    ),  # fmt: skip
    Case(
        "train-resume-without-checkpoint",
        StoreError,
        "no training checkpoint",
        lambda e: train(build_model(SPEC), TASK, TrainConfig(steps=1, progress=False), resume=e.plain_store),
    ),  # fmt: skip
    Case(
        "train-resume-other-config",
        ConfigError,
        r"another TrainConfig: steps \(2 vs 3\)",
        lambda e: train(
            build_model(SPEC),
            TASK,
            TrainConfig(steps=3, batch_size=4, progress=False, checkpoint_every=1),
            resume=e.checkpointed,
        ),
    ),  # fmt: skip
    Case(
        "train-resume-other-method",
        ConfigError,
        "another method",
        lambda e: train(
            build_model(SPEC),
            TASK,
            TrainConfig(steps=2, batch_size=4, progress=False, checkpoint_every=1),
            resume=e.checkpointed,
            method=_OtherMethod(),
        ),
    ),  # fmt: skip
    # recording
    Case(
        "recorder-empty-hooks",
        ConfigError,
        "hooks='' names no hook",
        lambda e: Recorder(e.model, e.root / "r2", hooks="", probe=TASK.sample(2, seed=0)),
    ),  # fmt: skip
    Case(
        "recorder-float-probe",
        ConfigError,
        "integer token ids, got dtype torch.float32",
        lambda e: Recorder(e.model, e.root / "r3", probe=torch.rand(4, 8)),
    ),  # fmt: skip
    Case(
        "recorder-probe-not-a-tensor",
        ConfigError,
        "probe must be a TaskBatch",
        lambda e: Recorder(e.model, e.root / "r4", probe=[[1, 2, 3]]),
    ),  # fmt: skip
    Case("recorder-no-probe", ConfigError, "needs a fixed probe batch", lambda e: Recorder(e.model, e.root / "r5")),
    Case(
        "recorder-every-zero",
        ConfigError,
        "every must be a positive",
        lambda e: Recorder(e.model, e.root / "r6", hooks=(), every=0),
    ),  # fmt: skip
    Case(
        "recorder-bad-dtype",
        ConfigError,
        "dtype must be",
        lambda e: Recorder(e.model, e.root / "r7", hooks=(), dtype="int8"),
    ),
    Case(
        "recorder-existing-store",
        StoreError,
        "overwrite=True",
        lambda e: Recorder(e.model, e.plain_store, hooks=()).open(),
    ),  # fmt: skip
    Case(
        "recorder-resume-missing",
        StoreError,
        "does not exist",
        lambda e: Recorder(e.model, e.root / "nowhere", resume=True),
    ),  # fmt: skip
    Case("recorder-unknown-component-kind", ConfigError, r"unknown component kind 'heads'.*did you mean \['head'",
         lambda e: Recorder(e.model, e.root / "r8", hooks=(), component_kinds=["heads"])),
    Case("recorder-component-kinds-a-string", ConfigError, r"got the string 'head'; pass \['head'\]",
         lambda e: Recorder(e.model, e.root / "r9", hooks=(), component_kinds="head")),
    Case("store-not-a-store", StoreError, "not a run store", lambda e: RunStore.open(e.root)),
    Case("rule-value-of-another-type", ConfigError,
         r"the verdict rule .*rule.json: QuestionRule field 'wrapper_threshold' must be a number, got '0.3'",
         lambda e: VerdictRule.load(e.write("rule.json", json.dumps(
             {**default_rule().to_dict(), "deletion": {"wrapper_threshold": "0.3"}}).encode()))),
    Case("store-a-file", StoreError, "it is a file; a run store is a folder", lambda e: RunStore.open(e.file)),
    Case("store-array-cut", StoreError, r"weight_delta.head.* need \d+: the file was cut",
         lambda e: RunStore.open(e.store_with_a_cut_array()).array("weight_delta.head")),
    Case(
        "store-unknown-array",
        ConfigError,
        "did you mean",
        lambda e: RunStore.open(e.plain_store).array("weight_delta.heads"),
    ),  # fmt: skip
    Case("store-under-a-file", StoreError, r"Cannot create a run store at .*a_file.txt is a file, not a folder",
         lambda e: RunStore.create(e.file / "run")),
    Case("store-overwrite-while-appending", StoreError,
         "Another process is appending to .*, so overwrite=True refuses to delete it",
         lambda e: _in_a_new_store(e, "live_run", lambda store: RunStore.create(store.path, overwrite=True))),
    Case("store-step-not-a-count", ConfigError, "step must be an int, got the bool True",
         lambda e: _in_a_new_store(e, "bool_step_run", lambda store: store.append(True))),
    # analysis
    Case(
        "pair-of-different-shapes",
        ConfigError,
        "differ in",
        lambda e: diagnose(
            e.model,
            build_model(ModelSpec(d_vocab=SPEC.d_vocab, n_ctx=SPEC.n_ctx, n_layers=2, d_model=16, n_heads=2)),
            TASK,
            TASK,
        ),
    ),  # fmt: skip
    Case("pair-of-two-precisions", ConfigError,
         r"the base model's weights are float32 and the tuned model's bfloat16.*clone\(dtype='float32'\)",
         lambda e: diagnose(e.model, e.model.clone(dtype="bfloat16"), TASK, TASK)),
    Case("diagnose-analyzer-names", ConfigError, r"analyzers takes analyzer instances, got 'weight_diff'",
         lambda e: diagnose(e.model, e.model.clone(), TASK, TASK, analyzers=["weight_diff"])),
    Case("diagnose-analyzer-class", ConfigError, r"got the class WeightDiff; pass WeightDiff\(\)",
         lambda e: diagnose(e.model, e.model.clone(), TASK, TASK, analyzers=[WeightDiff])),
    Case("diagnose-one-analyzer", ConfigError, r"analyzers takes a list of analyzers, got WeightDiff",
         lambda e: diagnose(e.model, e.model.clone(), TASK, TASK, analyzers=WeightDiff())),
    Case("diagnose-negative-seed", ConfigError, r"seed \(0 to 2147483647\) must be a whole number >= 0, got -1",
         lambda e: diagnose(e.model, e.model.clone(), TASK, TASK, seed=-1)),
    Case("diagnose-fractional-eval-size", ConfigError, r"eval_size .* must be a whole number >= 1, got 10.0",
         lambda e: diagnose(e.model, e.model.clone(), TASK, TASK, eval_size=10.0)),
    Case("diagnose-too-few-replicates", ConfigError, r"n_boot=5 bootstrap replicates cannot place the ends of a 90% "
         r"interval .*give n_boot >= 20", lambda e: diagnose(e.model, e.model.clone(), TASK, TASK, n_boot=5)),
    Case("diagnose-store-not-a-recording", ConfigError, r"was not written by a Recorder \(its meta.json names no model "
         r"spec\)", lambda e: diagnose(e.model, e.model.clone(), TASK, TASK, store=RunStore.open(e.store_not_a_recording()))),
    Case("diagnose-store-of-another-run", ConfigError, r"recorded from another run: the tuned model's weights are "
         r"none of the steps it measured in full \(\d+ of \d+ sampled weights differ",
         lambda e: diagnose(e.model, build_model(SPEC, seed=3), TASK, TASK, store=RunStore.open(e.plain_store))),
    Case("analyzer-context-and-another-pair", ConfigError, r"the context given to the analyzer holds its own pair",
         lambda e: WeightDiff()(ModelPair(e.model, e.model.clone()), TASK, TASK,
                                context=Context.build(ModelPair(e.model, e.model.clone()), TASK, TASK, eval_size=8))),
    Case(
        "pair-of-a-resized-vocabulary",
        ConfigError,
        rf"the fine-tune resized the vocabulary \({SPEC.d_vocab} -> {SPEC.d_vocab + 1} tokens.*load the tuned model with "
        rf"load_model\(PATH, d_vocab={SPEC.d_vocab}\)",
        lambda e: diagnose(e.model, build_model(dataclasses.replace(SPEC, d_vocab=SPEC.d_vocab + 1, d_vocab_out=0)),
                           TASK, TASK),  # fmt: skip
    ),
    Case(
        "pair-of-a-vocabulary-cut-the-wrong-way",
        ConfigError,
        rf"the tuned model has fewer token rows than the base \({SPEC.d_vocab + 1} -> {SPEC.d_vocab}\).*were the two swapped",
        lambda e: diagnose(build_model(dataclasses.replace(SPEC, d_vocab=SPEC.d_vocab + 1, d_vocab_out=0)), e.model,
                           TASK, TASK),  # fmt: skip
    ),
    Case(
        "load-model-on-more-tokens",
        ConfigError,
        rf"d_vocab={SPEC.d_vocab + 5} is more tokens than .* has \({SPEC.d_vocab}\)",
        lambda e: load_model(e.ckpt, d_vocab=SPEC.d_vocab + 5),
    ),
    Case(
        "load-model-on-no-tokens",
        ConfigError,
        r"d_vocab must be a whole number of tokens >= 1, got 0",
        lambda e: load_model(e.ckpt, d_vocab=0),
    ),
    Case(
        "diagnose-paths-not-models",
        ConfigError,
        r"base is a str \('base/'\), not a loaded model: load it with capwrap.load_model",
        lambda e: diagnose("base/", "adapter/", TASK, TASK),
    ),  # fmt: skip
    Case(
        "diagnose-task-spec-string",
        ConfigError,
        r"'pcfg=count,operand=a' is a task spec, not a task: make the task with capwrap.tasks.task_from_spec",
        lambda e: diagnose(e.model, e.model, "pcfg=count,operand=a", TASK),
    ),  # fmt: skip
    Case(
        "diagnose-no-analyzers",
        ConfigError,
        "no analyzers",
        lambda e: diagnose(e.model, e.model, TASK, TASK, analyzers=[]),
    ),
    Case(
        "diagnose-evidence-of-another-pair",
        ConfigError,
        "holds the evidence of another diagnosis: tuned_weights_sha256 differs .*; delete the folder",
        lambda e: e.diagnose_into_another_pairs_evidence(),
    ),
    # circuits
    Case("circuits-metric-a-mean", ConfigError, r"one value per sequence.*returned shape \[\]: return per-sequence",
         lambda e: _attribute(e, metric=lambda logits, batch: _logprob(logits, batch).mean())),
    Case("circuits-metric-per-position", ConfigError, "reduce over positions inside the metric",
         lambda e: _attribute(e, metric=lambda logits, batch: logits[..., 0])),
    Case("circuits-metric-not-differentiable", ConfigError, "not differentiable in the logits",
         lambda e: _attribute(e, metric=lambda logits, batch: (logits[:, -1].argmax(-1) == batch.answers).float())),
    Case("circuits-positional-mean-of-one", ConfigError, "over a single sequence",
         lambda e: _attribute(e, n=1, ablation="mean_positional")),
    Case("circuits-reference-without-a-mean", ConfigError, "uses none: leave reference out",
         lambda e: _attribute(e, ablation="zero", reference=TASK.sample(4, seed=1))),
    Case("circuits-reference-of-another-length", ConfigError, "as long as the batch",
         lambda e: _attribute(e, ablation="mean_positional", reference=TaskBatch(
             torch.zeros(4, 3, dtype=torch.long), torch.full((4,), 2), torch.zeros(4, dtype=torch.long)))),
    Case("circuits-tokens-not-a-batch", ConfigError, "must be a TaskBatch",
         lambda e: __import__("capwrap.circuits").circuits.attribute(e.model, TASK.sample(4, seed=0).tokens)),
    Case("circuits-start-without-a-schedule", ConfigError, "schedule is 'constant'",
         lambda e: __import__("capwrap").CircuitTuning(top_n=10, top_n_start=40)),
    Case("circuits-size-past-the-scored-edges", ConfigError, "exceeds the 2 edges the scores measure",
         lambda e: e.faithfulness_past_partial_scores()),
    Case("circuits-circuit-past-the-scored-edges", ConfigError, "a circuit of 5 edges exceeds the 2 edges the scores",
         lambda e: __import__("capwrap.circuits").circuits.Circuit.from_scores(e.partial_scores(), 5)),
    Case("circuits-faithfulness-of-a-circuit", ConfigError, "takes edge scores .* got a Circuit; .* use circuit_metric",
         lambda e: __import__("capwrap.circuits").circuits.faithfulness(e.model, TASK.sample(4, seed=0), e.circuit())),
    Case("circuits-edges-by-a-misspelled-name", ConfigError, "no edge 'L0H0->logit' in this graph",
         lambda e: __import__("capwrap.circuits").circuits.exact_scores(e.model, TASK.sample(4, seed=0),
                                                                        edges=["L0H0->logit"])),
    Case("circuits-metric-by-an-unknown-name", ConfigError, "unknown metric 'logodds'",
         lambda e: __import__("capwrap.circuits").circuits.attribute(e.model, TASK.sample(4, seed=0), metric="logodds")),
    Case("circuits-fractional-ig-steps", ConfigError, r"ig_steps \(integration points\) must be a whole number >= 1, got 2.5",
         lambda e: __import__("capwrap.circuits").circuits.attribute(e.model, TASK.sample(4, seed=0), method="eap-ig",
                                                                     ig_steps=2.5)),
    Case("circuits-sizes-not-a-list", ConfigError, r"ns is a list of circuit sizes, e.g. ns=\[5, 10, 20\], got 5",
         lambda e: __import__("capwrap.circuits").circuits.faithfulness(e.model, TASK.sample(4, seed=0), e.partial_scores(),
                                                                        ns=5)),
    Case("circuits-save-into-a-folder", ConfigError, "is a folder; give the circuit's file path",
         lambda e: e.circuit().save(e.root)),
    Case("circuits-node-by-name", ConfigError, "takes a Node",
         lambda e: __import__("capwrap.circuits").circuits.Graph.from_spec(SPEC).node_params("L0H1")),
    Case("circuits-empty-reference", ConfigError, "the reference batch is empty",
         lambda e: _attribute(e, ablation="mean", reference=TASK.sample(4, seed=1)[:0])),
    Case("circuits-measure-no-circuits", ConfigError, "no circuits to measure",
         lambda e: __import__("capwrap.circuits").circuits.circuit_metric(e.model, TASK.sample(4, seed=0), [])),
    Case("circuits-load-a-partial-file", CheckpointError, "lacks spec, edges, scores",
         lambda e: e.partial_circuit_file()),
    Case("circuits-subgraph-corrupted-ablation", ConfigError, "Subgraph.ablation must be",
         lambda e: __import__("capwrap").Subgraph(ablation="corrupted")),
    Case("circuits-subgraph-one-sequence", ConfigError, r"Subgraph.n \(sequences of each task\) must be a whole number >= 2",
         lambda e: __import__("capwrap").Subgraph(n=1)),
    Case("circuits-edges-a-string", ConfigError, "a list of edge names",
         lambda e: __import__("capwrap.circuits").circuits.Circuit.from_edges(
             __import__("capwrap.circuits").circuits.Graph.from_spec(SPEC), "L0H1->logits")),
    # the demo
    Case(
        "demo-unknown-scenario",
        ConfigError,
        "unknown demo scenario",
        lambda e: __import__("capwrap").run_demo(e.root / "d", scenario="nope"),
    ),  # fmt: skip
    Case("demo-out-is-a-file", ConfigError, "is a file", lambda e: __import__("capwrap").run_demo(e.file)),
    Case("demo-tuned-of-ones-own", ConfigError, "tuned is not an output of an earlier `capwrap demo`",
         lambda e: __import__("capwrap").run_demo(e.folder_with_a_tuned_model_of_ones_own())),
    Case("demo-into-a-diagnosis", ConfigError, "summary.json is not an output of an earlier `capwrap demo`",
         lambda e: __import__("capwrap").run_demo(e.diagnosis_folder())),
    # adapters, task specs, stores
    Case("adapter-config-a-list", CheckpointError, "holds a JSON list, not the object of settings peft writes",
         lambda e: load_model(e.adapter('["a", "list"]'))),
    Case("adapter-path-missing", CheckpointError, r"adapter folder .*nowhere does not exist; check the path",
         lambda e: load_model(e.ckpt, adapter=e.root / "nowhere")),
    Case("adapter-path-a-checkpoint", CheckpointError, r"has no adapter_config\.json, so it is not a PEFT adapter folder",
         lambda e: load_model(e.ckpt, adapter=e.ckpt)),
    Case("adapter-no-peft-type", CheckpointError, "names no peft_type",
         lambda e: __import__("capwrap.models.adapters").models.adapters.read_adapter(e.adapter('{"r": 4}'))),
    Case("pcfg-operand-and-prior", ConfigError, r"give operand= .* not both; got operand='b' and prior='low'",
         lambda e: PCFGTask("count", operand="b", prior="low")),
    Case("spec-operand-and-prior", ConfigError, r"give operand= .* or prior= .*, not both",
         lambda e: task_from_spec("pcfg=count,operand=b,prior=low")),
    Case("spec-offset-without-correlation", ConfigError, "give correlation= too",
         lambda e: task_from_spec("pcfg=count,operand=b,source=c,offset=5")),
    Case("spec-prior-not-numbers", ConfigError, "is not 3 probabilities over a/b/c",
         lambda e: task_from_spec("pcfg=count,prior=x/y/z")),
    Case("spec-prior-nan", ConfigError, "3 non-negative probabilities",
         lambda e: task_from_spec("pcfg=count,prior=nan/0/1")),
    Case("spec-empty-text", ConfigError, "text= is empty", lambda e: task_from_spec("text=,feature=word:Lily")),
    Case("texts-malformed-json", ConfigError, "cannot read .* as JSON .*well-formed",
         lambda e: load_texts(e.write("broken.json", "{not json"))),
    Case("texts-empty-file", ConfigError, "empty.txt holds no text: it is empty or blank",
         lambda e: load_texts(e.write("empty.txt", b"\n\n"))),
    Case("texts-not-utf8", ConfigError, "is not UTF-8 text", lambda e: load_texts(e.write("latin.txt", b"caf\xe9 au lait"))),
    Case("load-config-of-other-shape", ConfigError,
         "the checkpoint .*other_width: the weights do not fit the gpt2 model its config.json describes",
         lambda e: load_model(e.config_of_other_width())),
    Case("load-tensor-missing", ConfigError,
         r"the checkpoint .*tensor_missing: .*missing \['transformer.h.0.mlp.c_fc.bias'\]",
         lambda e: load_model(e.tensor_missing)),
    # the command line: one line, exit code 2
    Case("cli-info-missing-folder", None, "does not exist", argv=lambda e: ["info", str(e.root / "nowhere")]),
    Case("cli-info-config-not-json", None, "config", argv=lambda e: ["info", str(e.bad_config)]),
    Case(
        "cli-info-nan-weight",
        None,
        "non-finite values in transformer.h.0.mlp.c_fc.weight",
        argv=lambda e: ["info", str(e.nan_ckpt)],
    ),  # fmt: skip
    Case("cli-demo-out-is-a-file", None, "is a file", argv=lambda e: ["demo", "--out", str(e.file), "--quiet"]),
    Case("cli-demo-out-empty", None, r"the output folder is empty \(''\)", argv=lambda e: ["demo", "--out", "", "--quiet"]),
    Case("cli-demo-seed-negative", SystemExit, "--seed: expected a whole number from 0",
         argv=lambda e: ["demo", "--out", str(e.root / "d3"), "--seed", "-1"]),
    Case("cli-demo-unknown-option", SystemExit,
         r"^capwrap demo: error: unrecognized arguments: --bogus \(the options: capwrap demo --help\)",
         argv=lambda e: ["demo", "--out", str(e.root / "d4"), "--bogus"]),
    Case("cli-diagnose-out-empty", None, r"the output folder is empty \(''\)",
         argv=lambda e: ["diagnose", str(e.ckpt), str(e.ckpt), "--capability", CAP, "--downstream", DOWN, "--out", ""]),
    Case("cli-diagnose-seed-too-large", SystemExit, "--seed: expected a whole number from 0",
         argv=lambda e: ["diagnose", str(e.ckpt), str(e.ckpt), "--capability", CAP, "--downstream", DOWN,
                         "--seed", "99999999999999999999"]),
    Case("cli-diagnose-store-without-a-step", None, "holds no recorded step",
         argv=lambda e: ["diagnose", str(e.ckpt), str(e.ckpt), "--capability", CAP, "--downstream", DOWN,
                         "--store", str(e.store_without_a_step())]),
    Case("cli-diagnose-store-going-on-after-the-model", None, "had at step 0, but the store goes on to step 1",
         argv=lambda e: ["diagnose", str(e.ckpt), str(e.ckpt), "--capability", CAP, "--downstream", DOWN,
                         "--store", str(e.plain_store)]),
    Case("cli-diagnose-spec-before-loading", None, "not key=value",
         argv=lambda e: ["diagnose", str(e.root / "nowhere"), str(e.root / "nowhere"), "--capability", "count a",
                         "--downstream", DOWN]),
    Case("cli-diagnose-pcfg-spec-before-loading", None, "not both",
         argv=lambda e: ["diagnose", str(e.root / "nowhere"), str(e.root / "nowhere"), "--capability",
                         "pcfg=count,operand=b,prior=low", "--downstream", DOWN]),
    Case("cli-diagnose-rule-value-of-another-type", None, r"the verdict rule .*: QuestionRule field 'wrapper_threshold'",
         argv=lambda e: ["diagnose", str(e.ckpt), str(e.ckpt), "--capability", CAP, "--downstream", DOWN, "--rule",
                         str(e.write("rule2.json", json.dumps({**default_rule().to_dict(),
                                                               "deletion": {"wrapper_threshold": "0.3"}}).encode()))]),
    Case("cli-diagnose-comma-in-a-value", None, r"'b.txt' is not key=value .*write its comma as \\,",
         argv=lambda e: ["diagnose", str(e.ckpt), str(e.ckpt), "--capability", f"text={e.root}/a,b.txt,feature=dog",
                         "--downstream", DOWN]),
    Case("cli-diagnose-text-task-on-tracr", None, "compiled Tracr program: it reads the program's own vocabulary",
         argv=lambda e: ["diagnose", str(TRACR_COUNTER), str(TRACR_COUNTER), "--capability",
                         f"text={e.csv},feature=dog", "--downstream", "tracr=counter,operand=b"]),
    Case("cli-validate-cache-a-file", None, "the cache .* is a file",
         argv=lambda e: ["validate", "--split", "calibration", "--scenario", "cal/kept/noop/s4", "--cache", str(e.file),
                         "--out", str(e.root / "v2")]),
    Case("cli-validate-fit-held-out", None, "--fit fits the verdict rule on calibration scenarios only",
         argv=lambda e: ["validate", "--scenario", "held/kept/noop/*", "--fit", str(e.root / "rule.json"),
                         "--out", str(e.root / "v")]),
    Case(
        "cli-demo-eval-size-zero",
        SystemExit,
        "argument --eval-size: expected a positive whole number, got '0'",
        argv=lambda e: ["demo", "--out", str(e.root / "d2"), "--eval-size", "0"],
    ),  # fmt: skip
    Case(
        "cli-validate-out-is-a-file",
        None,
        "is a file",
        argv=lambda e: ["validate", "--split", "calibration", "--scenario", "cal/kept/noop/s4", "--out", str(e.file)],
    ),  # fmt: skip
    Case(
        "cli-diagnose-out-is-a-file",
        None,
        "is a file",
        argv=lambda e: [
            "diagnose",
            str(e.ckpt),
            str(e.ckpt),
            "--capability",
            CAP,
            "--downstream",
            DOWN,
            "--out",
            str(e.file),
        ],
    ),  # fmt: skip
    Case(
        "cli-diagnose-bad-spec",
        None,
        "not key=value",
        argv=lambda e: ["diagnose", str(e.ckpt), str(e.ckpt), "--capability", "count a", "--downstream", DOWN],
    ),  # fmt: skip
    Case(
        "cli-diagnose-missing-store",
        None,
        "No run store",
        argv=lambda e: [
            "diagnose",
            str(e.ckpt),
            str(e.ckpt),
            "--capability",
            CAP,
            "--downstream",
            DOWN,
            "--store",
            str(e.root / "nowhere"),
        ],
    ),  # fmt: skip
    Case(
        "cli-diagnose-text-without-tokenizer",
        None,
        "needs the model's tokenizer",
        argv=lambda e: [
            "diagnose",
            str(e.ckpt),
            str(e.ckpt),
            "--capability",
            "text=x.txt,feature=word:Lily",
            "--downstream",
            DOWN,
        ],
    ),  # fmt: skip
    Case(
        "cli-backend-not-installed",
        SystemExit,
        "invalid choice",
        argv=lambda e: ["info", str(e.ckpt), "--backend", _unavailable_backend()],
    ),  # fmt: skip
]


class _OtherMethod(FineTune):
    name = "other"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    return Env(tmp_path_factory.mktemp("bad_inputs"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_a_clear_error(case: Case, env: Env, capsys):
    if case.argv is None:
        with pytest.raises(case.error, match=case.match):
            case.run(env)
        return
    if case.error is SystemExit:  # argparse's own check: one line (not its usage block), exit code 2
        with pytest.raises(SystemExit) as info:
            main(case.argv(env))
        err = capsys.readouterr().err
        assert info.value.code == 2 and re.search(case.match, err)
        assert len(err.strip().splitlines()) == 1 and re.match(r"capwrap( \w+)?: error: ", err), err
        return
    assert main(case.argv(env)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("capwrap: error: "), err
    assert re.search(case.match, lines[0]) and "Traceback" not in err


def test_debug_shows_the_traceback(env: Env):
    with pytest.raises(OSError):
        main(["info", str(env.bad_config), "--debug"])


def test_the_docs_table_lists_exactly_these_cases():
    rows = [line for line in DOCS.read_text().splitlines() if line.startswith("| `")]
    documented = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        documented[cells[0].strip("`")] = cells[-1]
    assert sorted(documented) == sorted(c.id for c in CASES)
    for case in CASES:  # the table names the error each row gets
        expected = "exit code 2" if case.error in (None, SystemExit) else case.error.__name__
        assert expected in documented[case.id], (case.id, documented[case.id])
