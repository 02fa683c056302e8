"""Benchmark: the weight diff of a pair of large checkpoints, streamed one layer at a time.

Writes two randomly initialized Llama-shaped checkpoints (Hugging Face folders: config.json +
model.safetensors, bfloat16 like most released checkpoints; default: TinyLlama-1.1B's shape,
1.1B parameters, 2.2 GB each) where the "tuned" one differs from the base in a few layers, then
runs :func:`capwrap.analyzers.streaming.stream_weight_diff` (the per-component table, each matrix's
effective rank of change, the concentration headline) in a fresh process and reports its
peak resident memory and wall time, against the memory of holding the two models.

    python benchmarks/streaming_weight_diff.py --dir /tmp/big_pair [--layers 22] [--keep]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from capwrap.models.layouts import hf_shapes
from capwrap.models.spec import ModelSpec


def tinyllama_spec(layers: int) -> ModelSpec:
    return ModelSpec(d_vocab=32000, n_ctx=2048, n_layers=layers, d_model=2048, n_heads=32, d_mlp=5632,
                     architecture="llama", n_key_value_heads=4)  # fmt: skip


def write_pair(spec: ModelSpec, root: Path) -> int:
    """Base and tuned folders; returns the parameter count."""
    shapes = hf_shapes(spec)
    gen = torch.Generator().manual_seed(0)
    base = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
    tuned = dict(base)
    for name in [n for n in shapes if ".layers.3." in n or ".layers.7." in n]:  # fine-tuning moved two layers
        tuned[name] = (base[name].float() + 1e-3 * torch.randn(shapes[name], generator=gen)).to(torch.bfloat16)
    for folder, tensors in (("base", base), ("tuned", tuned)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        spec.to_hf_config().to_json_file(root / folder / "config.json")
        save_file(tensors, root / folder / "model.safetensors")
    return sum(t.numel() for t in base.values())


def measure(root: Path) -> dict:
    """Run the streamed diff in this (fresh) process; peak RSS and time."""
    from capwrap.analyzers.streaming import stream_weight_diff

    t0 = time.perf_counter()
    diff = stream_weight_diff(root / "base", root / "tuned")
    seconds = time.perf_counter() - t0
    table = diff.table
    moved = table.head(10)
    return {
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "largest_group_float32_gb": round(largest_group(root) * 4 / 2**30, 2),
        "components": len(table),
        "matrices_ranked": len(diff.ranks),
        "median_effective_rank_ratio": round(diff.headline["median_effective_rank_ratio"], 3),
        "top10pct_share": round(diff.headline["top10pct_share"], 3),
        "top_layers": sorted(set(moved["layer"].dropna().astype(int).tolist())),
    }


def largest_group(root: Path) -> int:
    """Parameters in the largest group streaming reads at once (embeddings, or one layer)."""
    from capwrap.analyzers.streaming import checkpoint_spec
    from capwrap.analyzers.weight_diff import layer_groups

    shapes = hf_shapes(checkpoint_spec(root / "base"))
    return max(sum(shapes[n].numel() for n in group) for group in layer_groups(list(shapes)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/capwrap_big_pair")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.dir)
    if args.measure_only:
        print(json.dumps(measure(root)))
        return
    spec = tinyllama_spec(args.layers)
    t0 = time.perf_counter()
    params = write_pair(spec, root)
    write_seconds = time.perf_counter() - t0
    out = subprocess.run([sys.executable, __file__, "--dir", str(root), "--measure-only"], capture_output=True,
                         text=True, check=True)  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    layer_params = sum(s.numel() for n, s in hf_shapes(spec).items() if ".layers.0." in n)
    report = {
        "parameters": params,
        "checkpoint_gb_each": round((root / "base" / "model.safetensors").stat().st_size / 2**30, 2),
        "write_seconds": round(write_seconds, 1),
        **result,
        "two_models_float32_gb": round(2 * params * 4 / 2**30, 2),
        "one_model_plus_one_layer_float32_gb": round((params + layer_params) * 4 / 2**30, 2),
    }
    print(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
