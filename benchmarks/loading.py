"""Benchmark: loading a checkpoint of each decoder family with capwrap, against ``transformers``.

For each family, writes a randomly initialized checkpoint with ``transformers`` itself
(``save_pretrained``; default shape: 8 layers, d_model 512, vocab 32,000, about 50M parameters,
float32), then times, alternating, ``transformers.AutoModelForCausalLM.from_pretrained(folder)``
and ``capwrap.load_model(folder)`` (reading the config, the spec, the safetensors, building the
``transformers`` model and wrapping it in a TransformerBridge, or a HookedTransformer with
``--backend hooked``). Reports the median of each and their ratio. **Goal: capwrap ≤ 1.5x.**
One torch thread; each load in the same process (warm file cache, as a user loading twice).

Two references, because ``from_pretrained`` in transformers 5 memory-maps the safetensors file and
reads no weight until the first forward pass: ``transformers`` alone, and TransformerLens's own
loader of the same folder (``TransformerBridge.boot_transformers``: ``from_pretrained`` plus the
bridge every TransformerLens user pays for) — the second says what capwrap adds on top of the
library it builds on (reading the config into a spec, the finiteness check of every weight, the
canonical views).

    python benchmarks/loading.py [--families qwen2 gemma2 ...] [--repeats 5] [--backend hooked]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformer_lens.model_bridge import TransformerBridge

import capwrap
from capwrap.models import ModelSpec
from capwrap.models.families import FAMILIES

NEW = ["mistral", "qwen2", "qwen3", "gpt_neox", "gemma2", "gemma3", "phi3", "olmo2"]


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A one-word tokenizer saved with each checkpoint (as published checkpoints have one), so that
    TransformerLens's loader does not look for one on the hub; both loaders read it."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")), unk_token="[UNK]"
    )


TOKENIZER = _tokenizer()


def write(family: str, root: Path, layers: int, d_model: int, vocab: int) -> tuple[Path, int]:
    spec = ModelSpec(d_vocab=vocab, n_ctx=2048, n_layers=layers, d_model=d_model, n_heads=d_model // 64,
                     n_key_value_heads=d_model // 128 if FAMILIES[family].supports("n_key_value_heads") else 0,
                     d_mlp=int(2.75 * d_model) if FAMILIES[family].features.gated else 4 * d_model,
                     architecture=family)  # fmt: skip
    folder = root / family
    # a checkpoint as transformers writes it (capwrap's own save writes the same layout)
    hf = transformers.AutoModelForCausalLM.from_config(spec.to_hf_config())
    hf.save_pretrained(folder)
    TOKENIZER.save_pretrained(folder)
    del hf
    return folder, spec.n_params


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", nargs="*", default=NEW)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    report = {
        "transformer_lens": capwrap.models.tl_version(),
        "transformers": transformers.__version__,
        "backend": args.backend or capwrap.models.default_backend(),
        "threads": 1,
        "families": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            folder, n_params = write(family, Path(tmp), args.layers, args.d_model, args.vocab)
            hf_times, tl_times, cw_times = [], [], []
            capwrap.load_model(folder, backend=args.backend)  # warm-up: imports, file cache
            boot = lambda f=folder: TransformerBridge.boot_transformers(str(f), device="cpu")  # noqa: E731
            boot()
            for _ in range(args.repeats):  # alternate, so drifting load on the machine hits all alike
                hf_times.append(timed(lambda f=folder: transformers.AutoModelForCausalLM.from_pretrained(f)))
                tl_times.append(timed(boot))
                cw_times.append(timed(lambda f=folder: capwrap.load_model(f, backend=args.backend)))
            t_hf, t_tl, t_cw = (statistics.median(t) for t in (hf_times, tl_times, cw_times))
            report["families"][family] = {
                "parameters": n_params,
                "seconds_transformers": round(t_hf, 3),
                "seconds_transformer_lens_boot": round(t_tl, 3),
                "seconds_capwrap": round(t_cw, 3),
                "ratio": round(t_cw / t_hf, 2),
                "ratio_to_transformer_lens": round(t_cw / t_tl, 2),
            }
            print(family, report["families"][family], flush=True)
    report["worst_ratio"] = max(r["ratio"] for r in report["families"].values())
    report["worst_ratio_to_transformer_lens"] = max(r["ratio_to_transformer_lens"] for r in report["families"].values())
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
