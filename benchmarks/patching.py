"""Benchmark: capwrap's batched activation patching against TransformerLens's ``patching`` functions
on the same sweep.

The sweep: the shipped demo base (4 layers, d_model 128, 0.8M parameters), the count-`a` task,
clean → corrupted (two samples of the task; the corrupted run is scored on the clean answers),
the residual stream, attention output, MLP output and every head's output at every position — the
four ``get_act_patch_*`` calls a TransformerLens user makes (``resid_pre``, ``attn_out``,
``mlp_out``, ``attn_head_out_by_pos``). capwrap runs each engine (at ``--memory-mb``) and its
defaults for the device (``engine="auto"``, ``memory_mb=None``). Reports seconds, patches per second, the largest
difference between the two (must be under 1e-5), and attribution patching's correlation with
the exact effects. Then the across-model sweep (base patched into the demo's tuned model), capwrap's
resumed engine against its own hook engine (TransformerLens has no across-model function).

    capwrap demo --out /tmp/demo_out          # for the tuned model (across-model part)
    python benchmarks/patching.py --tuned /tmp/demo_out/tuned [--device cuda] [--batch 16]

With ``--family qwen2`` (or any family of ``capwrap.models.families.FAMILIES``) the model is instead
a random one of that family with the demo base's shape (4 layers, d_model 128, 4 heads; 2 key/value
heads where the family has grouped-query attention; the family's features, e.g. Gemma-2's soft-caps
and post-norms), its weights scaled up so that patches have visible effects, on the same task:

    python benchmarks/patching.py --family qwen2 --threads 1
    python benchmarks/patching.py --family gemma2 --threads 1
"""

from __future__ import annotations

import argparse
import json

import torch
import transformer_lens.patching as tl_patching
from timing import timed

import capwrap
from capwrap.analyzers.patching import activation_patching, answer_logprob, correlation, engine_settings
from capwrap.demo import DEMO_BASE, demo_tasks
from capwrap.tasks.base import TaskBatch, answer_logits

SITES = ("resid_pre", "attn_out", "mlp_out", "head")
TL_FUNCTIONS = {
    "resid_pre": tl_patching.get_act_patch_resid_pre,
    "attn_out": tl_patching.get_act_patch_attn_out,
    "mlp_out": tl_patching.get_act_patch_mlp_out,
    "head": tl_patching.get_act_patch_attn_head_out_by_pos,
}


def _timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        out, seconds = timed(fn)
        best = min(best, seconds)
    return best, out


def family_model(family: str, d_vocab: int, n_ctx: int, backend: str | None) -> capwrap.CapModel:
    """A random model of ``family`` shaped like the demo base, with weights scaled up (seeded)."""
    from capwrap.models import ModelSpec, build_model
    from capwrap.models.families import FAMILIES

    gqa = 2 if FAMILIES[family].supports("n_key_value_heads") else 0
    spec = ModelSpec(d_vocab=d_vocab, n_ctx=n_ctx, n_layers=4, d_model=128, n_heads=4, n_key_value_heads=gqa,
                     architecture=family)  # fmt: skip
    model = build_model(spec, backend=backend, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, w in model.weights().items():
            if name == "unembed.W_U" and not spec.tie_embeddings:
                w.mul_(3.0 if spec.features.logit_softcap else 30.0)  # soft-capped logits would saturate
            elif w.ndim > 1:
                w.mul_(3.0)
            else:
                w.add_(0.2 * torch.randn(w.shape, generator=gen))
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tuned", default=None, help="the demo's tuned model folder, for the across-model part")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--family", default=None, help="a random model of this family, the demo base's shape")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (the RESULTS figures pin 1)")
    parser.add_argument("--memory-mb", type=float, default=128.0,
                        help="capwrap's memory budget per batched forward pass for the runs of each engine "
                             "(activation_patching's memory_mb); the run of the defaults takes the device's")  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    task = demo_tasks()["capability"]
    if args.family:
        model = family_model(args.family, task.d_vocab, task.seq_len, args.backend).to(args.device).eval()
    else:
        model = capwrap.load_model(str(DEMO_BASE), backend=args.backend).to(args.device).eval()
    clean, corrupt = task.sample(args.batch, seed=0), task.sample(args.batch, seed=1)
    corrupt = TaskBatch(corrupt.tokens, clean.answer_pos, clean.answers, corrupt.labels).to(args.device)
    clean = clean.to(args.device)

    def metric(logits):
        return answer_logprob(answer_logits(logits, corrupt), corrupt).mean()

    def run_tl():
        _, cache = model.module.run_with_cache(clean.tokens)
        return {
            site: fn(model.module, corrupt.tokens, cache, metric).detach().cpu() for site, fn in TL_FUNCTIONS.items()
        }

    def run_capwrap(method="exact", engine="resumed"):
        return activation_patching(model, corrupt, source_tokens=clean.tokens, sites=SITES, positions="each",
                                   method=method, engine=engine, progress=False, memory_mb=args.memory_mb)  # fmt: skip

    def run_defaults():  # the engine and memory budget activation_patching picks on this device
        return activation_patching(model, corrupt, source_tokens=clean.tokens, sites=SITES, positions="each",
                                   progress=False)  # fmt: skip

    settings = engine_settings(model)
    run_capwrap()  # warm-up
    t_tl, tl = _timed(run_tl, args.repeats)
    t_cw, cw = _timed(run_capwrap, args.repeats)
    t_hooks, hooks = _timed(lambda: run_capwrap(engine="hooks"), args.repeats)
    t_attr, attr = _timed(lambda: run_capwrap(method="attribution"), args.repeats)
    t_default, default = _timed(run_defaults, args.repeats)
    n = len(cw.table)
    diff = max(float((cw.grid(site) - tl[site]).abs().max()) for site in SITES)
    report = {
        "model": args.family or "demo base (gpt2)",
        "threads": torch.get_num_threads(),
        "device": args.device,
        "backend": model.backend,
        "transformer_lens": capwrap.models.model.tl_version(),
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "batch": args.batch,
        "memory_mb": args.memory_mb,
        "defaults": {"engine": settings.engine, "memory_mb": round(settings.memory_mb, 1)},
        "patches": n,
        "within": {
            "seconds_transformer_lens": round(t_tl, 3),
            "seconds_capwrap": round(t_cw, 3),
            "seconds_capwrap_hook_engine": round(t_hooks, 3),
            "seconds_attribution": round(t_attr, 3),
            "patches_per_second_transformer_lens": round(n / t_tl, 1),
            "patches_per_second_capwrap": round(n / t_cw, 1),
            "speedup": round(t_tl / t_cw, 2),
            "speedup_hook_engine": round(t_tl / t_hooks, 2),
            "seconds_capwrap_defaults": round(t_default, 3),
            "speedup_defaults": round(t_tl / t_default, 2),
            "max_abs_difference": diff,
            "attribution_correlation": round(correlation(cw.table["effect"], attr.table["effect"]), 4),
            "hook_engine_max_abs_difference": float((cw.values - hooks.values).abs().max()),
            "defaults_max_abs_difference": float((cw.values - default.values).abs().max()),
        },
    }
    if args.tuned:
        tuned = capwrap.load_model(args.tuned, backend=args.backend).to(args.device).eval()
        batch = task.sample(args.batch, seed=3).to(args.device)

        def across(method="exact", engine="resumed"):
            return activation_patching(tuned, batch, source=model, sites=SITES, positions="each", method=method,
                                       engine=engine, progress=False, memory_mb=args.memory_mb)  # fmt: skip

        t_a, a = _timed(across, args.repeats)
        t_ah, ah = _timed(lambda: across(engine="hooks"), args.repeats)
        t_aa, aa = _timed(lambda: across(method="attribution"), args.repeats)
        report["across"] = {
            "seconds_capwrap": round(t_a, 3),
            "seconds_capwrap_hook_engine": round(t_ah, 3),
            "seconds_attribution": round(t_aa, 3),
            "speedup_over_hook_engine": round(t_ah / t_a, 2),
            "max_abs_difference": float((a.values - ah.values).abs().max()),
            "attribution_correlation": round(correlation(a.table["effect"], aa.table["effect"]), 4),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
