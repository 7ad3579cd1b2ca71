"""numpy ↔ torch at the torch model's edge, sharing memory (nothing is copied).

The caches a graph drives keep numpy arrays, so the default engine (ONNX Runtime) runs without
torch; the torch reference model hands them tensors through `attend` and gets tensors back. numpy
has no bfloat16 of its own: ml_dtypes' is the same 16 bits, passed to torch through int16. torch is
imported here only by callers that hold tensors already.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def bfloat16() -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


def numpy_dtype(dtype) -> np.dtype:
    """A torch dtype (float32 / bfloat16) or anything numpy reads as one → the numpy dtype."""
    if isinstance(dtype, str) or str(dtype).startswith("torch."):
        name = str(dtype).removeprefix("torch.")
        return bfloat16() if name == "bfloat16" else np.dtype(name)
    return np.dtype(dtype)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as a numpy array over the same memory (strides kept; a cache keeps values, not
    their autograd history)."""
    import torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(bfloat16())
    return t.numpy()


def to_torch(a: np.ndarray | None) -> torch.Tensor | None:
    """A numpy array as a tensor over the same memory (strides kept); None stays None."""
    import torch

    if a is None:
        return None
    if a.dtype == np.float32:  # (the common case, decided without the slower dtype.name)
        return torch.from_numpy(a)
    if a.dtype.name == "bfloat16":  # (by name: a decode step's float32 arrays must not import ml_dtypes, ~0.5 s)
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)
