"""The contract between the bench harness and the processes it times.

A runner gets the prompt as token ids in a JSON file (the very same ids for every system), and
optionally the tokens to feed while decoding (`--follow`: the exact run's greedy tokens, so every
system's logits are taken at the same positions — teacher forcing costs what greedy decoding
costs). It may write the logits of each generated position (`--logits-out`, .npy) for the quality
comparison, and prints one JSON object on stdout with the fields of `edgetok run --json`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from edgetok.errors import EdgetokError
from edgetok.runtimes.engine import Stats


def read_ids(path: Path) -> list[int]:
    try:
        ids = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgetokError(f"cannot read token ids from {path}: {e}") from None
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise EdgetokError(f"{path} must hold a JSON list of token ids")
    return ids


def write_ids(path: Path, ids: Sequence[int]) -> None:
    Path(path).write_text(json.dumps(list(ids)))


def write_logits(path: Path, rows: Sequence[torch.Tensor | np.ndarray]) -> None:
    """One float32 row per generated position, (N, V)."""
    np.save(path, np.stack([np.asarray(r, dtype=np.float32).reshape(-1) for r in rows]))


def read_logits(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.load(path))


def result_json(tokens: list[int], prompt_tokens: int, stats: Stats, text: str = "") -> str:
    """The object `edgetok run --json` prints."""
    return json.dumps({
        "text": text,
        "tokens": tokens,
        "prompt_tokens": prompt_tokens,
        "finish_reason": "length",
        "stats": stats.to_dict(),
    })
