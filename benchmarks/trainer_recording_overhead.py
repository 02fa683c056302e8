"""Benchmark: wall-time overhead of recording a Hugging Face ``Trainer`` run with ``RecorderCallback``.

The demo's fine-tuning (the shipped base model as a ``GPT2LMHeadModel``; count b with C_Tr = 1;
the demo's batch, 48; AdamW, lr 3e-5, warmup + cosine) run by ``transformers.Trainer`` with and without a
``RecorderCallback`` at the demo's recording settings: every ``blocks.*.hook_resid_post`` on a
256-sequence probe batch every 10 steps, plus per-component weight-change and gradient norms.
``--adapter lora`` trains a peft LoRA adapter (r 8 on c_attn and c_fc, lr 1e-3) instead of every
weight; ``dora`` the same with DoRA (whose merged weights, rescaled per output, the recorder forms
densely at each due step); ``ia3`` an IA3 adapter on the same modules (c_fc's inputs scaled).
``--every`` and ``--probe-size`` change the recording settings (what a cheaper recording costs).
``--background`` measures due steps in a background thread on a copy of the weights
(``RecorderCallback(background=True)``): with ``--threads 1`` on a machine of two or more cores,
that thread has a core of its own.
Runs alternate (off, on, off, on, ...) so drifts in machine load hit both alike; the median of each
is reported, with the bare probe forward passes (the floor of any recorder) as a share of the run:
at these settings the probe's 256 sequences are 5.3 training batches, and a forward pass costs about
a third of a training step per sequence, so recording activations costs ~1.6 steps every 10.

    python benchmarks/trainer_recording_overhead.py [--steps 200] [--repeats 3] [--threads 1] [--adapter lora|dora|ia3] [--device cuda]
        [--every 10] [--probe-size 256] [--background]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from timing import timed

from capwrap.demo import DEMO_BASE, FINETUNE_CONFIG, demo_tasks
from capwrap.integrations import RecorderCallback, task_dataset
from capwrap.models import wrap_hf_model
from capwrap.recording import RunStore
from capwrap.recording.recorder import CAPTURE_ROWS

#: What ``--adapter`` trains: a peft config (built when asked for), and the run's name.
ADAPTERS = {
    "lora": (lambda peft: peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"], task_type="CAUSAL_LM"),
             "LoRA r=8 (c_attn, c_fc)"),
    "dora": (lambda peft: peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"], use_dora=True,
                                          task_type="CAUSAL_LM"), "DoRA r=8 (c_attn, c_fc)"),
    "ia3": (lambda peft: peft.IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"],
                                        task_type="CAUSAL_LM"), "IA3 (c_attn, c_fc)"),
}  # fmt: skip


def make_model(adapter: str | None) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(DEMO_BASE))
    if adapter is not None:
        import peft

        model = peft.get_peft_model(model, ADAPTERS[adapter][0](peft))
    return model


class TimedCallback(RecorderCallback):
    """The callback, with the training thread's time in it split: set-up (wrapping the model,
    creating the store, recording step 0), recorded steps, plain steps, and the end (waiting for
    the writer). On a GPU this is what the recorder keeps the CPU busy with, launches included."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seconds = {"setup": 0.0, "records": 0.0, "steps": 0.0, "end": 0.0}

    def on_train_begin(self, *args, **kwargs):
        start = time.perf_counter()
        super().on_train_begin(*args, **kwargs)
        self.seconds["setup"] += time.perf_counter() - start

    def on_optimizer_step(self, *args, **kwargs):
        due = self.recorder is not None and (self.recorder.current_step + 1) % self.recorder.every == 0
        start = time.perf_counter()
        super().on_optimizer_step(*args, **kwargs)
        self.seconds["records" if due else "steps"] += time.perf_counter() - start

    def on_train_end(self, *args, **kwargs):
        start = time.perf_counter()
        super().on_train_end(*args, **kwargs)
        self.seconds["end"] += time.perf_counter() - start


def one_run(
    steps: int, record: bool, adapter: str | None, seed: int, out: Path, data, device: str, every: int = 10, probe_size: int = 256,
    background: bool = False,
) -> tuple[float, dict]:
    model = make_model(adapter)
    callbacks = []
    if record:
        probe = demo_tasks()["capability"].sample(probe_size, seed=0)
        callbacks.append(TimedCallback(out / f"run{seed}", probe=probe, hooks="blocks.*.hook_resid_post", every=every,
                                       background=background))
    args = transformers.TrainingArguments(
        str(out / f"trainer{seed}"), max_steps=steps, per_device_train_batch_size=FINETUNE_CONFIG.batch_size,
        learning_rate=1e-3 if adapter else FINETUNE_CONFIG.lr, warmup_steps=FINETUNE_CONFIG.warmup,
        lr_scheduler_type="cosine", weight_decay=FINETUNE_CONFIG.applied_weight_decay, max_grad_norm=1.0, logging_steps=50,
        report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=device == "cpu", seed=seed, dataloader_num_workers=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model, args, train_dataset=data, callbacks=callbacks)
    _, elapsed = timed(trainer.train)
    if record:
        store = RunStore.open(out / f"run{seed}")
        assert len(store.array_steps("blocks.0.hook_resid_post")) == steps // every + 1
    return elapsed, callbacks[0].seconds if record else {}


def probe_forward_seconds(adapter: str | None, device: str, probe_size: int = 256) -> tuple[float, float]:
    """One pass over the probe batch in the recorder's chunks (:data:`~capwrap.recording.recorder.CAPTURE_ROWS`): through the plain
    Hugging Face model (the floor of any recorder), and capwrap's capture through the wrapped model's hooks."""
    plain = make_model(adapter).to(device)
    model = wrap_hf_model(make_model(adapter).to(device))
    tokens = demo_tasks()["capability"].sample(probe_size, seed=0).tokens.to(device)
    hooks = model.resolve_hooks("blocks.*.hook_resid_post")
    rows = CAPTURE_ROWS.get(torch.device(device).type) or len(tokens)  # as the recorder runs it

    def bare() -> None:
        with torch.inference_mode():
            for start in range(0, len(tokens), rows):
                plain(tokens[start : start + rows])

    times: dict[str, list[float]] = {"bare": [], "capture": []}
    for _ in range(6):  # alternating; the first of each is a warm-up
        for name, fn in (("bare", bare), ("capture", lambda: model.capture(tokens, hooks, batch_size=rows))):
            times[name].append(timed(fn)[1])
    return statistics.median(times["bare"][1:]), statistics.median(times["capture"][1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--adapter", choices=sorted(ADAPTERS), help="train a peft adapter, not every weight")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (Trainer's own placement)")
    parser.add_argument("--every", type=int, default=10, help="record every this many steps (the demo's: 10)")
    parser.add_argument("--probe-size", type=int, default=256, help="probe sequences (the demo's: 256)")
    parser.add_argument("--background", action="store_true", help="measure due steps in a background thread")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    out = Path(tempfile.mkdtemp(prefix="capwrap-bench-"))
    try:
        data = task_dataset(demo_tasks()["downstream_correlated"], args.steps * FINETUNE_CONFIG.batch_size, seed=1)
        one_run(10, True, args.adapter, 999, out, data, args.device)  # warm-up (allocator, kernels, imports)
        times: dict[bool, list[float]] = {False: [], True: []}
        parts: list[dict] = []
        for r in range(args.repeats):
            for record in (False, True):
                elapsed, seconds = one_run(
                    args.steps, record, args.adapter, r, out, data, args.device, args.every, args.probe_size,
                    args.background,
                )
                times[record].append(elapsed)
                parts += [seconds] if record else []
        off, on = statistics.median(times[False]), statistics.median(times[True])
        bare, capture = probe_forward_seconds(args.adapter, args.device, args.probe_size)
        records = args.steps // args.every + 1
        size = sum(f.stat().st_size for f in (out / "run0").rglob("*") if f.is_file())
        result = {
            "training": ADAPTERS[args.adapter][1] if args.adapter else "full fine-tuning",
            "threads": args.threads,
            "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
            "transformers": transformers.__version__,
            "steps": args.steps,
            "every": args.every,
            "probe_size": args.probe_size,
            "background": args.background,
            "seconds_without": round(off, 2),
            "seconds_with": round(on, 2),
            "overhead_percent": round(100 * (on - off) / off, 1),
            "probe_forwards_percent": round(100 * bare * records / off, 1),
            "capture_percent": round(100 * capture * records / off, 1),
            # the callback's own time in the training thread, medians over the recorded runs, as a
            # share of the run without recording
            "callback_percent": {k: round(100 * statistics.median(p[k] for p in parts) / off, 1) for k in parts[0]},
            "seconds_per_step_without": round(off / args.steps, 3),
            "store_megabytes": round(size / 2**20, 1),
            "runs": {"without": [round(t, 2) for t in times[False]], "with": [round(t, 2) for t in times[True]]},
        }
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
