"""The native kernels, built from source by the package build (`pip install -e .`; metadata: pyproject.toml).

One portable build: the inner loops are compiled for several instruction sets inside the
extension and chosen at import by what the CPU supports (no -march=native: the wheel or editable
build runs on any x86-64; other architectures get the portable loops only).
"""

import platform

from setuptools import Extension, setup

x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
setup(
    ext_modules=[
        Extension(
            "edgetok.kernels._mixed_attention",
            sources=["edgetok/kernels/mixed_attention.cpp"],
            depends=["edgetok/kernels/mixed_attention_body.h", "edgetok/kernels/mixed_attention_problem.h"],
            language="c++",
            extra_compile_args=["-std=c++17", "-O3", "-fopenmp-simd", "-ffp-contract=fast", "-fno-math-errno"]
            + ([] if x86 else ["-DEDGETOK_PORTABLE_ONLY"]),
            extra_link_args=["-pthread"],
        ),
        # a library ONNX Runtime loads (kernels/ort_ops.py), not a Python module: no Python API
        Extension(
            "edgetok.kernels._ort_ops",
            sources=["edgetok/kernels/ort_ops.cpp", "edgetok/kernels/q4_matmul.cpp", "edgetok/kernels/attention_op.cpp"],
            depends=["edgetok/kernels/q4_matmul_body.h", "edgetok/kernels/ort_abi.h"],
            language="c++",
            extra_compile_args=["-std=c++17", "-O3", "-fopenmp-simd", "-ffp-contract=fast", "-fno-math-errno", "-fvisibility=hidden",
                                # GCC flags its own AVX-512 intrinsics ("__Y may be used uninitialized")
                                "-Wno-maybe-uninitialized"]
            + ([] if x86 else ["-DEDGETOK_PORTABLE_ONLY"]),
        ),
    ]
)
