"""llama.cpp's own quantizer (`llama_model_quantize`, through llama-cpp-python): its standard mixes
(Q4_K_M, Q5_K_M, Q4_0, Q8_0, …) from an f32 / f16 GGUF, with or without an importance matrix, as
llama-quantize makes them. The benchmarks compare edgetok's allocator with these; the tests check
that llama.cpp takes an imatrix edgetok wrote.

The API takes the imatrix as a NULL-terminated array of (tensor name, float values, count): the
mean squares llama-quantize computes from a file (exporters/imatrix.py's Imatrix.values).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

from edgetok.errors import EdgetokError
from edgetok.exporters.imatrix import Imatrix

MIXES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL")


def quantize_with_llamacpp(source: Path, out: Path, mix: str, imatrix: Imatrix | None = None, threads: int = 0) -> Path:
    """llama.cpp's `mix` of the f32 / f16 GGUF at `source`, written to `out`."""
    import llama_cpp

    if mix not in MIXES:
        raise EdgetokError(f"unknown llama.cpp mix '{mix}' (choose from {', '.join(MIXES)})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    keep = []  # the arrays the C structs point into, alive until the call returns
    if imatrix is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix.sums) + 1))()  # the last: name NULL
        for entry, name in zip(entries, sorted(imatrix.sums)):
            values = imatrix.values(name).numpy()
            data = (ctypes.c_float * len(values))(*values.tolist())
            keep.append(data)
            entry.name, entry.data, entry.size = name.encode(), ctypes.cast(data, ctypes.POINTER(ctypes.c_float)), len(values)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise EdgetokError(f"llama.cpp could not quantize {source} as {mix}")
    return out
