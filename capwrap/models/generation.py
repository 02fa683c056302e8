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

from typing import Any

import torch

from capwrap.errors import ConfigError
from capwrap.models.model import CapModel

__all__ = ["generate", "start_token_id"]


def start_token_id(tokenizer: Any) -> int:
    """The token a text starts from: the tokenizer's BOS token, else its EOS token (GPT-2's tokenizers
    have one token for both, ``<|endoftext|>``, which also separates its training texts).

    Text tasks put it in front of every text and :func:`generate` samples from it. A BOS or EOS
    token that is not in the vocabulary (its id is the unknown token's: TransformerLens names
    ``<|endoftext|>`` the EOS and BOS of a tokenizer that has neither) does not count.

    Raises:
        ConfigError: the tokenizer has neither a BOS nor an EOS token of its vocabulary (any other id
            would put an arbitrary vocabulary item in front of every text).
    """
    unknown = getattr(tokenizer, "unk_token", None)
    absent: list[str] = []
    for role in ("BOS", "EOS"):
        token, token_id = (getattr(tokenizer, f"{role.lower()}_token{end}", None) for end in ("", "_id"))
        if token_id is None:
            continue
        if token_id == getattr(tokenizer, "unk_token_id", None) and token != unknown:
            absent.append(f"its {role} token {token!r} reads as the unknown token {unknown!r}")
            continue
        return int(token_id)
    name = getattr(tokenizer, "name_or_path", "") or ""
    named = type(tokenizer).__name__ + (f" of {name}" if name else " (built in memory)")
    why = f" ({'; '.join(absent)})" if absent else ""
    raise ConfigError(
        f"the tokenizer {named} has neither a BOS nor an EOS token in its vocabulary{why}, so capwrap has no token "
        "to start a text with (it puts one in front of every text a task reads or a model writes). Set the token "
        "the model was trained to start texts with, e.g. tokenizer.bos_token = '<s>' (a token of its vocabulary), "
        "and save it into the checkpoint folder with tokenizer.save_pretrained(FOLDER)"
    )


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
        ConfigError: the model has no tokenizer, or one without BOS and EOS tokens (:func:`start_token_id`),
            or ``n`` / ``max_new_tokens`` / ``temperature`` are out of range.
    """
    tok = model.tokenizer
    if tok is None:
        raise ConfigError("generation needs a tokenizer; this model has none (load it from a folder with one)")
    if n <= 0 or max_new_tokens <= 0 or temperature < 0:
        raise ConfigError("n and max_new_tokens must be positive and temperature >= 0")
    start = [start_token_id(tok)] + (tok(prompt, add_special_tokens=False)["input_ids"] if prompt else [])
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
