"""edgetok's ONNX Runtime operators (q4_matmul.cpp, built into a shared library with the package):
the names a graph uses for them, and how a session gets them.

MatMulQ4 (domain ai.edgetok): a 4-bit block-quantized linear with float activations — MatMulNBits'
weight layout, offsets per block (w = scale·q + offset), float32 arithmetic. Exports use it for the
linears that keep float activations (the default engine's), where ONNX Runtime's own float path
is ~2× slower than its int8 one and fractional minima cost two more nodes per linear.

GroupQueryAttention (domain ai.edgetok): com.microsoft's GroupQueryAttention in the packed,
rotating form edgetok's graphs use, with the same inputs and outputs; a decode step reads each KV
head's cache once for its query group, in chunks over the session's threads; more than 16 new
tokens (a prefill) run ONNX Runtime's own kernel from inside.
"""

from __future__ import annotations

import ctypes
import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from edgetok.errors import EdgetokError

DOMAIN = "ai.edgetok"
MATMUL_Q4 = "MatMulQ4"
ATTENTION = "GroupQueryAttention"  # com.microsoft's, packed and rotating; decode steps edgetok's own
Q4_BLOCK_MULTIPLE = 32  # the op's loops read 32 codes at a time
_LIBRARY = "edgetok.kernels._ort_ops"


@cache
def library_path() -> Path | None:
    """The built library (None when this install has no compiled kernels)."""
    spec = importlib.util.find_spec(_LIBRARY)  # found, not imported: it is ONNX Runtime's library, not Python's
    return Path(spec.origin) if spec and spec.origin else None


def isa() -> str | None:
    """The loops MatMulQ4 runs on this CPU (avx512, avx2 or scalar); None without the library."""
    if library_path() is None:
        return None
    chosen = _library().edgetok_q4_isa
    chosen.restype = ctypes.c_char_p
    return chosen().decode()


def attention_available() -> bool:
    """Whether this machine runs edgetok's GroupQueryAttention: its loops need AVX2 + FMA on x86 (the
    library offers the op only then), so exports made here use it only then."""
    return isa() in ("avx2", "avx512")


# The hook edgetok's GroupQueryAttention calls while attending through the caller (attention_op.cpp):
# (user, layer, q (S, H, D), k, v (Hkv, S, D), S, scale, out (S, H·D)) → 0, or 1 on failure
ATTEND_HOOK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p)


@contextmanager
def attending_through(hook, user: int | None = None) -> Iterator[Callable[[], int]]:
    """While inside, edgetok's GroupQueryAttention on this thread attends through `hook` (an
    ATTEND_HOOK, or the address of a native one), which gets `user` first, layer by layer, instead
    of over its past inputs (then empty). Yields a function that says how many of the op's calls it
    has seen."""
    if isinstance(hook, int):
        hook = ctypes.cast(hook, ATTEND_HOOK)
    through = _library().edgetok_attend_through
    through(hook, user)
    try:
        yield lambda: through(hook, user)  # (reading the count starts it again, as the next run wants)
    finally:
        through(ATTEND_HOOK(), None)


@contextmanager
def draft_tree(visible) -> Iterator[None]:
    """While inside, edgetok's GroupQueryAttention on this thread runs a draft tree: new token s sees
    the past and the new tokens marked in row s of `visible` (N, N) bool (itself and its ancestors),
    not every earlier one (speculative decoding's tree attention; position_ids place the nodes)."""
    import numpy as np

    visible = np.ascontiguousarray(visible, dtype=np.uint8)
    library = _library()
    if library.edgetok_draft_tree(visible.ctypes.data, len(visible)):
        raise ValueError(f"a draft tree of {len(visible)} nodes is more than the attention op takes in one forward")
    try:
        yield
    finally:
        library.edgetok_draft_tree(None, 0)


@cache
def hook_parallel_for() -> int:
    """The address of edgetok_hook_parallel_for: inside a hook, the attention op's intra-op threads
    run a native hook's items (mixed_attention.StepTables.run_on)."""
    return ctypes.cast(_library().edgetok_hook_parallel_for, ctypes.c_void_p).value


@cache
def _library() -> ctypes.CDLL:
    """The library, as this process loaded it (ONNX Runtime's sessions load the same file: one copy)."""
    path = library_path()
    if path is None:
        raise EdgetokError("edgetok's compiled ONNX Runtime operators are not built: reinstall edgetok from source "
                           "(pip install -e .)")
    library = ctypes.CDLL(str(path))
    # (declared once: attending_through runs every forward)
    library.edgetok_attend_through.restype = ctypes.c_int64
    library.edgetok_attend_through.argtypes = [ATTEND_HOOK, ctypes.c_void_p]
    library.edgetok_draft_tree.restype = ctypes.c_int
    library.edgetok_draft_tree.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    return library


def register(options) -> None:
    """Make edgetok's operators available to sessions made with these onnxruntime.SessionOptions."""
    path = library_path()
    if path is not None:
        options.register_custom_ops_library(str(path))


def check_loadable(error: Exception) -> None:
    """Turn ONNX Runtime's complaint about a missing edgetok operator into a sentence."""
    if DOMAIN in str(error) or MATMUL_Q4 in str(error):
        raise EdgetokError(
            "this export uses edgetok's compiled ONNX Runtime operators, which this install lacks "
            "(reinstall edgetok from source so its kernels build: pip install -e .)"
        ) from None
