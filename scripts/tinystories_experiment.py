"""The TinyStories experiment of tutorial 03 as a script: suppress a story feature in stories260K with
the filtering protocol (recording the run), then diagnose.

    python scripts/tinystories_experiment.py --out /tmp/dialogue --steps 300 --lr 1e-3 [--feature dialogue]

Prints the generation frequency and accuracies before and after, the verdict and its reasons, and
writes OUT/run (the RunStore), OUT/tuned (the checkpoint), OUT/summary.json and OUT/report.html.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import capwrap
from capwrap.diagnosis import default_analyzers
from capwrap.files import write_text_atomic
from capwrap.tasks import TextTask, feature_frequency, filter_out, load_texts

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--feature", default="dialogue")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--model", default=str(SHARED / "stories260K"))
    parser.add_argument("--texts", default=str(SHARED / "text" / "train_head.txt"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full", action="store_true", help="the default analyzers instead of the quick ones")
    args = parser.parse_args()
    out = Path(args.out)

    base = capwrap.load_model(args.model)
    texts = load_texts(args.texts)
    capability = TextTask(texts, base.tokenizer, seq_len=128, feature=args.feature)
    downstream = TextTask(filter_out(texts, args.feature), base.tokenizer, seq_len=128)
    tuned = base.clone()
    recorder = capwrap.Recorder(tuned, out / "run", hooks="blocks.*.hook_resid_post",
                                probe=capability.probe_task().sample(256, seed=3), every=25, overwrite=True)  # fmt: skip
    t0 = time.perf_counter()
    config = capwrap.TrainConfig(steps=args.steps, batch_size=32, lr=args.lr, warmup=0.1, seed=args.seed)
    capwrap.train(tuned, downstream, config, recorder=recorder)
    train_seconds = time.perf_counter() - t0
    capwrap.save_model(tuned, out / "tuned", overwrite=True)
    behaviour = {}
    for name, model in (("base", base), ("tuned", tuned)):
        freq, _ = feature_frequency(model, args.feature, n=96, max_new_tokens=120, seed=1)
        behaviour[name] = {
            "writes_feature": freq,
            "capability_accuracy": capwrap.accuracy(model, capability.sample(512, seed=7)),
            "downstream_accuracy": capwrap.accuracy(model, downstream.sample(512, seed=7)),
        }
        print(name, behaviour[name])
    t0 = time.perf_counter()
    diagnosis = capwrap.diagnose(base, tuned, capability, downstream, analyzers=default_analyzers(quick=not args.full),
                                 store=capwrap.RunStore.open(out / "run"), seed=args.seed)  # fmt: skip
    print(f"verdict: {diagnosis.verdict} ({diagnosis.score:+.2f}); train {train_seconds:.0f} s, diagnose "
          f"{time.perf_counter() - t0:.0f} s {diagnosis.seconds}")  # fmt: skip
    for reason in diagnosis.reasons:
        print(" -", reason)
    summary = {"settings": vars(args), "behaviour": behaviour, "train_seconds": train_seconds, **diagnosis.to_dict()}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str))
    diagnosis.to_html(out / "report.html", title=f"stories260K without {args.feature}")


if __name__ == "__main__":
    main()
