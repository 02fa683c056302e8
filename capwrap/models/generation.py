"""Sampling text from a model: what does it write?

Plain ancestral sampling with a temperature (greedy at ``temperature=0``), batched, reproducible
from a seed, recomputing the whole prefix at each step (the models capwrap studies are small; this
keeps one code path for every backend).

Examples:
    >>> import capwrap
    >>> model = capwrap.load_model("../shared/data/tinystories/stories260K")  # doctest: +SKIP
    >>> generate(model, n=1, max_new_tokens=20, temperature=0)[0][:40]  # doctest: +SKIP
    'Once upon a time, there was a little gir'
"""

from __future__ import annotations

import torch

from capwrap.errors import ConfigError
from capwrap.models.model import CapModel

__all__ = ["generate"]


@torch.inference_mode()
def generate(
    model: CapModel,
    n: int = 8,
    max_new_tokens: int = 100,
    temperature: float = 1.0,
    seed: int = 0,
    prompt: str | None = None,
) -> list[str]:
    """``n`` continuations of ``prompt`` (default: the beginning of a text, BOS), decoded.

    Generation stops at the model's context, at ``max_new_tokens``, or per sequence at EOS.

    Raises:
        ConfigError: the model has no tokenizer, or ``n`` / ``max_new_tokens`` / ``temperature`` are out of range.
    """
    tok = model.tokenizer
    if tok is None:
        raise ConfigError("generation needs a tokenizer; this model has none (load it from a folder with one)")
    if n <= 0 or max_new_tokens <= 0 or temperature < 0:
        raise ConfigError("n and max_new_tokens must be positive and temperature >= 0")
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    start = [bos] + (tok(prompt, add_special_tokens=False)["input_ids"] if prompt else [])
    tokens = torch.tensor([start] * n, device=model.device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    done = torch.zeros(n, dtype=torch.bool)
    eos = tok.eos_token_id
    model.eval()
    for _ in range(min(max_new_tokens, model.spec.n_ctx - tokens.shape[1])):
        logits = model(tokens)[:, -1].float().cpu()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen)[:, 0]
        if eos is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            done |= nxt == eos
        tokens = torch.cat([tokens, nxt[:, None].to(tokens.device)], 1)
        if bool(done.all()):
            break
    out = []
    for row in tokens[:, 1:].tolist():
        if eos is not None and eos in row:
            row = row[: row.index(eos)]
        out.append(tok.decode(row, skip_special_tokens=True))
    return out
