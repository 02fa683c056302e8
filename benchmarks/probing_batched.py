"""Benchmark: fitting probes for every layer x recorded step in one batched problem, against
loops that fit them one at a time:

* the same solver one probe at a time (accuracies must agree exactly);
* the loop a PyTorch user writes: per probe, an ``nn.Linear`` trained with ``torch.optim.Adam`` and
  ``F.cross_entropy`` through autograd, same hyperparameters (accuracies within ±1 point);
* scikit-learn's ``LogisticRegression`` (lbfgs, the same L2 penalty), one probe at a time — what a
  researcher would otherwise write (``pip install scikit-learn``; skipped when it is absent).

Uses the demo's recorded run (``capwrap demo --out DIR`` first): 4 layers x 31 recorded steps =
124 probes on the 256-sequence probe batch, label ``count_a`` at the answer position; the same
split and standardization for all.

    python benchmarks/probing_batched.py --run DIR/run [--device cuda]

With ``--device cuda`` every fit runs on the GPU (the batched solve, the same solver one probe at a
time, and the autograd loop); scikit-learn's loop stays on the CPU, where it runs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from timing import timed

from capwrap.analyzers import fit_probes
from capwrap.recording import RunStore
from capwrap.recording.recorder import load_probe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", required=True, help="a RunStore folder, e.g. the demo's OUT/run")
    parser.add_argument("--label", default="count_a")
    parser.add_argument("--device", default="cpu", help="where the probes are fitted (cpu or cuda)")
    args = parser.parse_args()
    store = RunStore.open(args.run)
    probe = load_probe(store)
    rows = torch.arange(len(probe))
    feats = torch.stack(
        [
            store.array(h)[i][rows, probe.answer_pos].float()
            for h in store.meta["hooks"]
            for i in range(len(store.array_steps(h)))
        ]
    )
    labels = probe.labels[args.label]
    feats, labels = feats.to(args.device), labels.to(args.device)
    fit_probes(feats[:1], labels, steps=5, seed=0)  # warm-up (kernels, allocator)
    batched, t_batched = timed(lambda: fit_probes(feats, labels, seed=0).test_accuracy)
    looped, t_loop = timed(
        lambda: torch.cat([fit_probes(feats[i : i + 1], labels, seed=0).test_accuracy for i in range(len(feats))])
    )
    autograd, t_autograd = timed(lambda: _autograd_loop(feats, labels))
    batched, looped, autograd, feats, labels = (t.cpu() for t in (batched, looped, autograd, feats, labels))
    report = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "probes": len(feats), "sequences": len(labels), "d": feats.shape[-1],
        "seconds_batched": round(t_batched, 2), "seconds_loop": round(t_loop, 2),
        "speedup": round(t_loop / t_batched, 1),
        "seconds_autograd_loop": round(t_autograd, 2),
        "speedup_vs_autograd_loop": round(t_autograd / t_batched, 1),
        "max_accuracy_difference_vs_autograd_points": round(100 * float((batched - autograd).abs().max()), 2),
        "max_accuracy_difference_points": round(100 * float((batched - looped).abs().max()), 2),
        "mean_accuracy": round(float(batched.mean()), 4),
    }  # fmt: skip
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        report["sklearn"] = "not installed"
    else:
        t0 = time.perf_counter()
        sk = _sklearn_loop(LogisticRegression, feats, labels)
        t_sk = time.perf_counter() - t0
        report["seconds_sklearn_loop"] = round(t_sk, 2)
        report["speedup_vs_sklearn_loop"] = round(t_sk / t_batched, 1)
        report["max_accuracy_difference_vs_sklearn_points"] = round(100 * float((batched - sk).abs().max()), 2)
        report["mean_accuracy_difference_vs_sklearn_points"] = round(100 * float((batched - sk).mean()), 2)
    print(json.dumps(report, indent=2))


def _split_and_scale(feats: torch.Tensor, labels: torch.Tensor):
    """fit_probes's split (seed 0, 25% held out) and per-probe standardization."""
    n = len(labels)
    n_test = int(round(0.25 * n))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(feats.device)
    test, train = order[:n_test], order[n_test:]
    x = feats.float()
    return (x - x[:, train].mean(1, keepdim=True)) / x[:, train].std(1, keepdim=True).clamp_min(1e-6), train, test


def _autograd_loop(feats: torch.Tensor, labels: torch.Tensor, steps: int = 300, lr: float = 0.05,
                   weight_decay: float = 1e-3) -> torch.Tensor:  # fmt: skip
    """Held-out accuracy of one nn.Linear probe per leading index, trained with autograd + Adam."""
    x, train, test = _split_and_scale(feats, labels)
    classes, y = torch.unique(labels, return_inverse=True)
    out = []
    for i in range(len(x)):
        probe = torch.nn.Linear(x.shape[-1], len(classes), device=x.device)
        torch.nn.init.zeros_(probe.weight), torch.nn.init.zeros_(probe.bias)
        opt = torch.optim.Adam(probe.parameters(), lr=lr)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(probe(x[i, train]), y[train])
            loss = loss + weight_decay * probe.weight.square().sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            out.append((probe(x[i, test]).argmax(-1) == y[test]).float().mean())
    return torch.stack(out)


def _sklearn_loop(estimator, feats: torch.Tensor, labels: torch.Tensor, weight_decay: float = 1e-3) -> torch.Tensor:
    """Held-out accuracy of one scikit-learn probe per leading index, on fit_probes's split and scaling."""
    x, train, test = _split_and_scale(feats, labels)
    # fit_probes minimizes mean CE + wd * |W|^2; sklearn minimizes sum CE + |W|^2 / (2C)
    c = 1.0 / (2 * weight_decay * len(train))
    out = []
    for i in range(len(x)):
        model = estimator(C=c, max_iter=1000).fit(x[i, train].numpy(), labels[train].numpy())
        out.append(model.score(x[i, test].numpy(), labels[test].numpy()))
    return torch.tensor(out)


if __name__ == "__main__":
    main()
