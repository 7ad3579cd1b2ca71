"""Transcoding (issue 20, item 4): an ONNX export of a Q4_1 GGUF carries its codes. q4_1's block
(32 values, fp16 scale d and minimum m: value = d·q + m) is MatMulNBits' 4-bit block with an exact
zero point, so round-to-nearest on the dequantized block finds d, m and the same codes: the
graph's weights are the GGUF's, up to fp16 storage of the block offset (no re-rounding)."""

from __future__ import annotations

import json

import numpy as np
import onnx
from conftest import run_cli
from onnx import numpy_helper

from edgetok.exporters import onnx_rewrites as rw
from edgetok.models.names import layer
from edgetok.models.sources import load_source


def test_q41_codes_carried_to_matmul_nbits(wide_folder, tmp_path):
    gguf_file = tmp_path / "m.q4_1.gguf"
    r = run_cli("export", wide_folder, "--format", "gguf", "--quant", "q4_1", "--no-verify", "-o", gguf_file)
    assert r.exit_code == 0, r.output
    out = tmp_path / "onnx"
    r = run_cli("export", gguf_file, "--format", "onnx", "--weights", "int4", "--activations", "float",
                "--eval-tokens", "64", "-o", out)
    assert r.exit_code == 0, r.output
    source = load_source(str(gguf_file))  # the GGUF's blocks, decoded: the export's reference
    model = onnx.load(str(out / "model.onnx"))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for name in (f"{layer(0, 'mlp.down_proj')}.weight", f"{layer(1, 'self_attn.o_proj')}.weight"):
        w = source.weights[name].numpy()
        half = lambda n, name=name: inits[f"{name}.{n}.fp16"].astype(np.float32)  # noqa: E731  (to_fp16's storage)
        got = rw.unpack_matmul_nbits(inits[f"{name}.q"], half("scales"), inits[f"{name}.zero_points"],
                                     half("offsets").T, 4, w.shape[1])
        # the codes and scales are the GGUF's: only the offsets' fp16 storage differs from its m
        err = np.abs(got - w).max()
        assert err <= np.abs(w).max() * 1e-3, (name, err, np.abs(w).max())
    report = json.loads((out / "edgetok.json").read_text())
    assert report["parity"]["kl_mean"] < 1e-3
