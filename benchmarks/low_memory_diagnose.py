"""Benchmark: peak memory of ``capwrap diagnose --quick --memory low`` on a large pair.

Writes two random Llama-shaped checkpoints (TinyLlama-1.1B's shape by default, bfloat16 on disk
like the released model; the "tuned" one differs in two layers; as benchmarks/streaming_weight_diff.py
does), then measures, each in a fresh process:

* **one model**: load the base and run one forward pass on a batch of the capability task — the
  least any diagnosis needs, the yardstick of the target;
* **the diagnosis**: ``diagnose_checkpoints(..., quick=True, memory="low")`` (what ``capwrap
  diagnose --quick --memory low`` runs) with every analyzer of ``--quick`` at its batch sizes and
  sample sizes; ``--steps N`` cuts the reverse fine-tuning, control training and probe-fitting
  steps (which repeat the same passes and do not change the peak) so that a CPU run ends;
* optionally (``--normal``) the same diagnosis with both models in memory;
* optionally (``--dispatch SIZE``) the same diagnosis with each model loaded by accelerate with
  ``device_map="auto", max_memory={"cpu": SIZE}`` (what ``capwrap diagnose --device-map auto
  --max-memory cpu=SIZE`` runs): what does not fit in ``SIZE`` goes to an offload folder on disk.
  The run reports whether every analyzer's statistic and headline numbers equal the low-memory
  run's (reverse fine-tuning does not run on offloaded weights: ``--only`` without ``revival`` to
  compare).

``--threads`` sets the torch threads (default one); ``--eval-size`` (at least 128, the attention
analyzer's sample) shrinks the shared evaluation set, whose passes are chunked, to save time at a
large shape without changing the peak; ``--samples N`` caps every analyzer's own sample (probes'
``n``, pruning's ``score_size``, revival's ``check_size``, patching's ``n``) at ``N`` for the same
reason: their passes are chunked and reduced pass by pass, so the peak does not grow with them.

Reported per run: peak resident memory (``ru_maxrss``) and wall time, and for the diagnosis the peak
reached inside each analyzer (a sampling thread), against the one-model yardstick.

    python benchmarks/low_memory_diagnose.py [--layers 22] [--steps 2] [--normal] [--only pruning ...] [--dir /tmp/big_pair]
                                             [--no-recompute] [--threads 1] [--eval-size 0] [--samples 0]
                                             [--dispatch 300MB]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

CAPABILITY, DOWNSTREAM = "pcfg=count,operand=a", "pcfg=count,operand=b,correlation=1"


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class _Sampler:
    """The process's resident memory every 50 ms; the peak since the last :meth:`mark`."""

    def __init__(self) -> None:
        import os

        self._page, self.peak, self._stop = os.sysconf("SC_PAGE_SIZE"), 0, False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.05)

    def mark(self) -> float:
        peak, self.peak = max(self.peak, self.rss()), self.rss()
        return peak / 2**30


def one_model(root: Path) -> dict:
    import capwrap
    from capwrap.tasks.spec import task_from_spec

    t0 = time.perf_counter()
    model = capwrap.load_model(root / "base")
    batch = task_from_spec(CAPABILITY, None).sample(64, seed=0)
    with torch.inference_mode():
        model(batch.tokens)
    return {"peak_rss_gb": round(_peak_gb(), 2), "seconds": round(time.perf_counter() - t0, 1)}


def diagnosis(root: Path, memory: str, steps: int | None, only: list[str] | None = None, recompute: bool = True,
              eval_size: int | None = None, samples: int | None = None, dispatch: str | None = None) -> dict:  # fmt: skip
    import capwrap.diagnosis.checkpoints as checkpoints
    from capwrap.analyzers.base import Analyzer
    from capwrap.training import TrainConfig

    if eval_size:  # a smaller shared evaluation set: its passes are chunked, so only the time changes
        checkpoints.QUICK_EVAL_SIZE = eval_size

    if not recompute:  # low-memory training as it was before blocks were recomputed (for comparison)
        low_memory = TrainConfig.low_memory
        TrainConfig.low_memory = lambda self: replace(low_memory(self), recompute_activations=False)
    from capwrap.diagnosis import default_analyzers, diagnose_checkpoints

    sampler, peaks = _Sampler(), {}
    original = Analyzer.__call__

    def measured(self, *args, **kwargs):
        sampler.mark()
        try:
            return original(self, *args, **kwargs)
        finally:
            peaks[self.name] = round(sampler.mark(), 2)

    Analyzer.__call__ = measured

    def analyzers(quick: bool, memory: str = "normal"):
        out = [a for a in default_analyzers(quick=quick, memory=memory) if not only or a.name in only]
        if steps is not None:
            for a in out:
                for attr in ("max_steps", "control_steps", "steps"):
                    if hasattr(a, attr):
                        setattr(a, attr, steps)
        if samples:
            for a in out:
                for attr in ("n", "score_size", "check_size"):
                    if hasattr(a, attr):
                        setattr(a, attr, min(getattr(a, attr), samples))
        return out

    checkpoints.default_analyzers = analyzers
    placement = {}
    if dispatch:  # accelerate's device map: what does not fit in `dispatch` of CPU memory goes to disk
        placement = {"device_map": "auto", "max_memory": {"cpu": dispatch}, "offload_folder": root / "offload"}
    t0 = time.perf_counter()
    result = diagnose_checkpoints(root / "base", root / "tuned", CAPABILITY, DOWNSTREAM, quick=True, memory=memory,
                                  progress=False, **placement)  # fmt: skip
    shutil.rmtree(root / "offload", ignore_errors=True)
    return {
        "peak_rss_gb": round(_peak_gb(), 2),
        "seconds": round(time.perf_counter() - t0, 1),
        "analyzer_peak_rss_gb": peaks,
        "analyzer_seconds": result.seconds,
        "values": {e.analyzer: e.value for e in result.evidence},
        "headlines": {e.analyzer: e.headline for e in result.evidence},
        "verdict": result.verdict,
    }


def _in_fresh_process(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/capwrap_low_memory_pair")
    parser.add_argument("--layers", type=int, default=22, help="TinyLlama has 22")
    parser.add_argument("--steps", type=int, default=2, help="training/probe steps per analyzer (0: --quick's own)")
    parser.add_argument("--normal", action="store_true", help="also run with both models in memory")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--only", nargs="+", metavar="ANALYZER", help="run only these analyzers (by name)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (memory figures do not depend on it)")
    parser.add_argument("--eval-size", type=int, default=0,
                        help="sequences per task of the shared evaluation set (0: --quick's 256); fewer only save time")  # fmt: skip
    parser.add_argument("--samples", type=int, default=0,
                        help="cap each analyzer's own sample at this many sequences (0: --quick's); fewer only save time")  # fmt: skip
    parser.add_argument("--no-recompute", action="store_true",
                        help="train without recomputing blocks in the backward pass (as before it existed)")  # fmt: skip
    parser.add_argument("--dispatch", default=None, metavar="SIZE",
                        help="also run with device_map='auto', max_memory={'cpu': SIZE} (the rest on disk)")  # fmt: skip
    parser.add_argument("--run", choices=["one", "low", "normal", "dispatched"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.dir)
    steps = args.steps or None
    if args.run:
        if args.run == "one":
            result = one_model(root)
        else:
            memory = "low" if args.run == "dispatched" else args.run
            result = diagnosis(root, memory, steps, args.only, not args.no_recompute, args.eval_size, args.samples,
                               args.dispatch if args.run == "dispatched" else None)  # fmt: skip
        print(json.dumps(result))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from streaming_weight_diff import tinyllama_spec, write_pair

    spec = tinyllama_spec(args.layers)
    if not (root / "tuned" / "model.safetensors").exists():
        write_pair(spec, root)
    common = ["--dir", str(root), "--steps", str(args.steps)] + (["--only", *args.only] if args.only else [])
    common += (["--no-recompute"] if args.no_recompute else []) + ["--threads", str(args.threads)]
    common += ["--eval-size", str(args.eval_size)] if args.eval_size else []
    common += ["--samples", str(args.samples)] if args.samples else []
    report = {"parameters": spec.n_params, "float32_model_gb": round(spec.n_params * 4 / 2**30, 2),
              "steps": steps or "quick", "torch_threads": args.threads, "eval_size": args.eval_size or "quick",
              "samples": args.samples or "quick"}  # fmt: skip
    report["one_model"] = _in_fresh_process([*common, "--run", "one"])
    report["low"] = _in_fresh_process([*common, "--run", "low"])
    report["low"]["over_one_model"] = round(report["low"]["peak_rss_gb"] / report["one_model"]["peak_rss_gb"], 2)
    if args.normal:
        report["normal"] = _in_fresh_process([*common, "--run", "normal"])
        report["normal"]["over_one_model"] = round(
            report["normal"]["peak_rss_gb"] / report["one_model"]["peak_rss_gb"], 2
        )
    if args.dispatch:
        report["dispatched"] = _in_fresh_process([*common, "--dispatch", args.dispatch, "--run", "dispatched"])
        run = report["dispatched"]
        run["over_one_model"] = round(run["peak_rss_gb"] / report["one_model"]["peak_rss_gb"], 2)
        low = report["low"]

        def same(a: float, b: float) -> bool:  # NaN: not applicable in both
            return a == b or (a != a and b != b)

        run["same_values_as_low"] = {name: same(v, low["values"][name]) for name, v in run["values"].items()}
        run["same_headline_numbers_as_low"] = {
            name: f"{sum(same(x, low['headlines'][name][k]) for k, x in numbers.items())} of {len(numbers)}"
            for name, numbers in run.pop("headlines").items()
        }
        low.pop("headlines")
    print(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
