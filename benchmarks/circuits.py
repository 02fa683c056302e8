"""Edge attribution on the demo model: precision against references, and speed against a training step.

Measures, on the shipped demo base model (4 blocks, 4 heads, d_model 128; 479 edges) and the
capability task (count ``a``):

* **EAP = hook reference**: the largest difference between :func:`capwrap.circuits.attribute` and
  the textbook implementation over TransformerLens's split-input hooks
  (:func:`capwrap.circuits.split_input_eap`), for each ablation (goal: 1e-5);
* **EAP / EAP-IG / EAP-IG on nodes against exact edge patching** (:func:`capwrap.circuits.exact_scores`, every edge
  ablated alone): Pearson correlation of the signed scores and of ``|score|``, and the overlap of the
  top-25 edges, for each metric in ``--metrics`` (goal for EAP-IG: >= 0.9);
* **speed**: scoring every edge on a 96-sequence batch (one forward and one backward pass) against one
  training step (forward, backward, AdamW) on the same batch, and a circuit-tuning step (which
  scores from its own pass) against a fine-tuning step (goal: scoring <= 3x a step);
* **faithfulness** of the EAP-IG circuits of count ``a``: metric recovered with the rest ablated.

``--architecture gemma2`` (any family ``ModelSpec`` builds) runs the same on a model of the demo's
shape in that family, pretrained as the demo base is but for ``--pretrain-steps`` steps and kept in
``--cache`` (so a second run reuses it): for blocks the demo does not have, such as Gemma-2's and
OLMo-2's post-norms (the split-input reference refuses those, so ``reference`` is skipped for them).

    python benchmarks/circuits.py [--backend hooked] [--exact-size 64] [--repeats 5] [--metrics answer_logprob]
        [--circuit-metric answer_logprob] [--faithfulness-metric answer_logprob] [--only speed] [--device cuda]
        [--architecture gemma2 --pretrain-steps 1500 --cache /tmp/capwrap-circuits]

Prints one JSON object; the figures and the command are in RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from timing import synchronize, timed

import capwrap
from capwrap.circuits import Circuit, attribute, exact_scores, faithfulness, metrics, split_input_eap
from capwrap.circuits.attribution import METHODS
from capwrap.demo import DEMO_BASE, PRETRAIN_CONFIG, demo_spec, demo_tasks, pretrain_demo_base
from capwrap.tasks import task_loss


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        times.append(timed(fn)[1])
    return statistics.median(times)


def _top_overlap(a, b, k: int = 25) -> float:
    top_a = set(torch.argsort(a.values.abs(), descending=True)[:k].tolist())
    top_b = set(torch.argsort(b.values.abs(), descending=True)[:k].tolist())
    return len(top_a & top_b) / k


SECTIONS = ("reference", "exact", "speed", "faithfulness")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, help="hooked or bridge (default: the installed TL's default)")
    parser.add_argument("--exact-size", type=int, default=64, help="sequences for the comparison with exact patching")
    parser.add_argument("--ig-steps", type=int, nargs="+", default=[10], help="EAP-IG's steps (several: one row each)")
    parser.add_argument(
        "--exact-seeds", type=int, nargs="+", default=[2],
        help="seeds of the samples compared with exact patching (several: one result per sample)",
    )  # fmt: skip
    parser.add_argument("--ablations", nargs="+", default=["mean_positional", "mean", "corrupted"],
                        choices=["mean_positional", "mean", "corrupted"], help="ablations compared with exact patching")  # fmt: skip
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                        help="attribution methods compared with exact patching")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    answer_metrics = [name for name in metrics.__all__ if name.startswith("answer_")]
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=["answer_logprob", "answer_logodds", "answer_logit", "answer_prob"],
        choices=answer_metrics,
        help="metrics edges are scored by in the comparison with exact patching (capwrap.circuits.metrics)",
    )
    parser.add_argument("--circuit-metric", default="answer_logprob", choices=answer_metrics,
                        help="the metric the faithfulness section scores edges by (which circuits it picks)")  # fmt: skip
    parser.add_argument("--faithfulness-metric", default="answer_logprob", choices=answer_metrics,
                        help="the metric the faithfulness section measures the circuits by")  # fmt: skip
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run these sections")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--architecture", default=None,
                        help="a family (gemma2, olmo2, ...): a model of the demo's shape pretrained in it (default: the demo base)")  # fmt: skip
    parser.add_argument("--pretrain-steps", type=int, default=1500, help="pretraining steps for --architecture")
    parser.add_argument("--cache", default="/tmp/capwrap-circuits", help="where --architecture's model is kept")
    args = parser.parse_args()
    args.ig_steps, args.exact_seeds = list(dict.fromkeys(args.ig_steps)), list(dict.fromkeys(args.exact_seeds))
    torch.set_num_threads(args.threads)

    model = _model(args)
    out: dict = {
        "model": repr(model),
        "capability_accuracy": capwrap.tasks.accuracy(model, demo_tasks()["capability"].sample(1024, seed=123)),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "transformer_lens": ".".join(map(str, capwrap.models.tl_version())),
        "torch_threads": args.threads,
    }
    sections = {
        "reference": ("eap_vs_split_input_reference", _reference),
        "exact": ("vs_exact_edge_patching", _versus_exact),
        "speed": ("speed", _speed),
        "faithfulness": ("faithfulness", _faithfulness),
    }
    for section in args.only:
        if section == "reference" and model.spec.features.post_norm:
            print("skipping reference: the split-input reference refuses post-norm blocks", file=sys.stderr)
            continue
        key, run = sections[section]
        out[key] = run(model, args)
    print(json.dumps(out, indent=1))


def _model(args) -> capwrap.CapModel:
    """The demo base, or a model of its shape in ``--architecture`` pretrained as it was (cached)."""
    if args.architecture is None:
        return capwrap.load_model(str(DEMO_BASE), backend=args.backend, device=args.device)
    folder = Path(args.cache) / f"{args.architecture}-{args.pretrain_steps}"
    if not folder.exists():
        demo = demo_spec()
        spec = capwrap.ModelSpec(d_vocab=demo.d_vocab, n_ctx=demo.n_ctx, n_layers=demo.n_layers, d_model=demo.d_model,
                                 n_heads=demo.n_heads, architecture=args.architecture)  # fmt: skip
        config = dataclasses.replace(PRETRAIN_CONFIG, steps=args.pretrain_steps)
        started = time.perf_counter()
        model = pretrain_demo_base(config, backend=args.backend, progress=False, spec=spec)
        model.metadata["wall_seconds"] = round(time.perf_counter() - started, 1)
        capwrap.save_model(model, str(folder))
    return capwrap.load_model(str(folder), backend=args.backend, device=args.device)


def _reference(model, args) -> dict:
    """EAP against the split-input hook reference, for every ablation."""
    capability = demo_tasks()["capability"]
    batch = capability.sample(96, seed=0).to(model.device)
    corrupted = capability.sample(96, seed=1).tokens.to(model.device)
    reference = {}
    for ablation in ("mean", "mean_positional", "zero", "corrupted"):
        kwargs = {"corrupted": corrupted} if ablation == "corrupted" else {}
        ours = attribute(model, batch, ablation=ablation, **kwargs)
        ref = split_input_eap(model, batch, ablation=ablation, **kwargs)
        diff = float((ours.values - ref.values).abs().max())
        reference[ablation] = {"max_abs_diff": diff, "max_abs_score": float(ref.values.abs().max())}
    return reference


def _versus_exact(model, args) -> dict:
    """Every method against exact edge patching, for each metric and ablation (and each sample
    seed and number of EAP-IG steps when several are given)."""
    capability = demo_tasks()["capability"]
    versus: dict = {}
    for seed in args.exact_seeds:
        small = capability.sample(args.exact_size, seed=seed).to(model.device)
        small_corrupted = capability.sample(args.exact_size, seed=seed + 1).tokens.to(model.device)
        for metric_name in args.metrics:
            metric = getattr(metrics, metric_name)
            for ablation in args.ablations:
                kwargs = {"corrupted": small_corrupted} if ablation == "corrupted" else {}
                start = time.perf_counter()
                exact = exact_scores(model, small, metric=metric, ablation=ablation, **kwargs)
                row = {"exact_seconds": time.perf_counter() - start}
                for method in args.methods:
                    for steps in [1] if method == "eap" else args.ig_steps:
                        scores = attribute(
                            model, small, metric=metric, method=method, ablation=ablation, ig_steps=steps, **kwargs
                        )
                        key = method if method == "eap" or len(args.ig_steps) == 1 else f"{method}-{steps}"
                        row[key] = {
                            "pearson": scores.correlation(exact),
                            "pearson_abs": scores.correlation(exact, absolute=True),
                            "top25_overlap": _top_overlap(scores, exact),
                        }
                sample = versus if len(args.exact_seeds) == 1 else versus.setdefault(f"seed{seed}", {})
                sample.setdefault(metric_name, {})[ablation] = row
                print(f"sample {seed}, {metric_name}, {ablation}: {json.dumps(row)}", file=sys.stderr, flush=True)
    return {"sequences": args.exact_size, "ig_steps": args.ig_steps, "seeds": args.exact_seeds, **versus}


def _speed(model, args) -> dict:
    """Scoring every edge on 96 sequences against a training step; circuit-tuning against fine-tuning."""
    tasks = demo_tasks()
    batch = tasks["capability"].sample(96, seed=0).to(model.device)
    trainable = model.clone().train()
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=1e-5)

    def train_step() -> None:
        loss = task_loss(trainable(batch.tokens), batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step_s = _median_seconds(train_step, args.repeats)
    eap_s = _median_seconds(lambda: attribute(model, batch, ablation="mean"), args.repeats)
    ig_s = _median_seconds(lambda: attribute(model, batch, method="eap-ig", ig_steps=5, ablation="mean"), 2)

    config = capwrap.TrainConfig(steps=args.repeats + 1, batch_size=96, lr=1e-5, warmup=0.0, progress=False)
    finetune_s = _run_seconds(model, tasks["downstream_correlated"], config, capwrap.FineTune())
    circuit_s = _run_seconds(model, tasks["downstream_correlated"], config, capwrap.CircuitTuning(top_n=50))
    return {
        "batch": 96,
        "train_step_s": step_s,
        "eap_all_edges_s": eap_s,
        "eap_over_train_step": eap_s / step_s,
        "eap_ig5_s": ig_s,
        "finetune_step_s": finetune_s,
        "circuit_tuning_step_s": circuit_s,
        "circuit_tuning_over_finetune": circuit_s / finetune_s,
    }


def _faithfulness(model, args) -> dict:
    """Metric recovered by count ``a``'s EAP-IG circuits with the rest ablated."""
    seed, steps = args.exact_seeds[0], args.ig_steps[0]
    small = demo_tasks()["capability"].sample(args.exact_size, seed=seed).to(model.device)
    scores = attribute(model, small, method="eap-ig", ig_steps=steps, ablation="mean_positional",
                       metric=getattr(metrics, args.circuit_metric))  # fmt: skip
    kwargs = {"metric": getattr(metrics, args.faithfulness_metric), "ablation": "mean_positional"}
    curve = faithfulness(model, small, scores, ns=[0, 5, 10, 20, 40, 80, 160, 479], **kwargs)
    greedy = faithfulness(model, small, scores, ns=[5, 10, 20, 40, 80], select="greedy", **kwargs)
    return {
        "scored_by": args.circuit_metric,
        "measured_by": args.faithfulness_metric,
        "seed": seed,
        "ig_steps": steps,
        "model_metric": curve.model_metric,
        "empty_metric": curve.empty_metric,
        "top_edges": curve.table.to_dict("records"),
        "greedy": greedy.table.to_dict("records"),
        "top20_components": Circuit.from_scores(scores, 20).components,
    }


def _run_seconds(model, task, config, method) -> float:
    """Median wall time of a training step of ``method`` (the first step excluded)."""
    times: list[float] = []
    last = [time.perf_counter()]

    def clock(info) -> None:
        synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    capwrap.train(model.clone(), task, config, method=method, callbacks=[clock])
    return statistics.median(times[1:])


if __name__ == "__main__":
    main()
