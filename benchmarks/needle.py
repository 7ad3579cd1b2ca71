"""Needle retrieval on real text: a fact planted at a depth of the essays, the question at the end."""

from __future__ import annotations

import edgetok
from edgetok.texts import essays

NEEDLE = "The secret passphrase for the vault is 'amber falcon 7319'."
QUESTION = "What is the secret passphrase for the vault?"
ANSWER = "7319"


def needle_prompt(model: edgetok.Model, context: int, depth: float) -> list[int]:
    """About `context` tokens of essays with NEEDLE at `depth` (0..1) and QUESTION after them, in
    the chat template."""
    tok = model.tokenizer
    body = tok.encode(essays(context * 6), add_special_tokens=False)[: context - 120]
    cut = int(len(body) * depth)
    text = tok.decode(body[:cut]) + "\n" + NEEDLE + "\n" + tok.decode(body[cut:])
    messages = [{"role": "user", "content": text + "\n\n" + QUESTION}]
    return model.encode(messages, chat=True)


def found(model: edgetok.Model, tokens: list[int]) -> bool:
    """Whether a continuation names the answer."""
    return ANSWER in model.tokenizer.decode(tokens)
