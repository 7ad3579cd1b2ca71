"""The default engine's precision: which activations keep the fp32 reference's next tokens, at what speed.

SmolLM2's int4 export holds the Q4_1 GGUF's own codes, so its weights are the reference's; what
differs is how ONNX Runtime multiplies them. Three exports of the same codes — int8 activations
(`--activations int8`), float activations in the layers with the int8 head ("float, int8 head"),
and the default (`--activations float`: float layers, the head's top 16 logits recomputed in float)
— against the fp32 torch reference, teacher-forced on several kinds of text: top-1 agreement and
mean KL; llama.cpp on the same GGUF beside them; and decode tokens/s at 1K, interleaved, 2 threads.

    flock /tmp/edgetok-bench.lock .venv/bin/python benchmarks/default_engine.py [--out benchmarks/results/default_engine.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch

from edgetok import texts
from edgetok.exporters.options import OnnxOptions
from edgetok.exporters.pipeline import export
from edgetok.exporters.verify import compare, reference_logits
from edgetok.models.sources import load_source
from edgetok.runtimes.backends.onnxruntime import OnnxBackend

TOKENS = 512  # per kind of text
KINDS = {  # files every machine with Python and Debian has, and the essays edgetok ships
    "essays": lambda: texts.essays(),
    "python source": lambda: Path(os.__file__).read_text(),
    "legal (GPL-3)": lambda: Path("/usr/share/common-licenses/GPL-3").read_text(),
    "json": lambda: json.dumps({"rows": [{"id": i, "name": f"item-{i}", "square": i * i, "ratio": i / 7} for i in range(400)]}),
}


def onnx_logits(backend, tokens: list[int]) -> torch.Tensor:
    cache = backend.new_cache()
    return torch.from_numpy(np.concatenate([backend.forward(tokens[i:i + 256], cache, last=len(tokens[i:i + 256]))
                                            for i in range(0, len(tokens), 256)]))


def without_rescoring(folder: Path, into: Path) -> Path:
    """The export with its head's TopK rescoring cut off: float layers, the int8 head alone."""
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    scatter = next(n for n in model.graph.node if n.op_type == "ScatterElements")
    for n in model.graph.node:  # the reshape after the head reads the un-rescored logits
        n.input[:] = [scatter.input[0] if i == scatter.output[0] else i for i in n.input]
    into.mkdir()
    onnx.save(model, into / "model.onnx")
    os.link(folder / "model.onnx.data", into / "model.onnx.data")
    return into


def decode_speed(step, prompt: list[int], n: int = 64) -> float:
    step(prompt)
    t = time.perf_counter()
    for tok in range(n):
        step([prompt[tok]])
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/default_engine.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    src = load_source("smollm2")
    work = Path(tempfile.mkdtemp(prefix="edgetok-default-"))
    try:
        folders = {}
        for act in ("int8", "float"):
            folders[act] = work / act
            export(OnnxOptions(model="smollm2", output=folders[act], activations=act, verify=False, threads=2))
        folders["float, int8 head"] = without_rescoring(folders["float"], work / "float-int8-head")
        base = load_source(str(folders["float"]))
        backends = {name: OnnxBackend(replace(base, path=f), threads=2) for name, f in folders.items()}
        import llama_cpp

        llm = llama_cpp.Llama(model_path=str(src.path), n_ctx=2048, n_threads=2, n_batch=512, logits_all=True, verbose=False)
        quality: dict[str, dict] = {name: {} for name in [*backends, "llama.cpp"]}
        for kind, read in KINDS.items():
            ids = src.tokenizer.encode(read())[:TOKENS]
            ref = reference_logits(src, ids)
            for name, b in backends.items():
                r = compare(ref, onnx_logits(b, ids), ids)
                quality[name][kind] = {"top1": round(r.top1_agreement, 4), "kl_mean": round(r.kl_mean, 5)}
            llm.reset()
            llm.eval(ids)
            r = compare(ref, torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32)), ids)
            quality["llama.cpp"][kind] = {"top1": round(r.top1_agreement, 4), "kl_mean": round(r.kl_mean, 5)}
        prompt = src.tokenizer.encode(texts.essays())[:960]
        llm_fast = llama_cpp.Llama(model_path=str(src.path), n_ctx=2048, n_threads=2, n_batch=512, verbose=False)
        speeds: dict[str, list[float]] = {name: [] for name in quality}
        for _ in range(2):  # interleaved rounds
            for name in backends:
                b = backends[name]
                cache = b.new_cache()
                speeds[name].append(decode_speed(lambda t, b=b, cache=cache: b.forward(t, cache), prompt))
            llm_fast.reset()
            speeds["llama.cpp"].append(decode_speed(llm_fast.eval, prompt))
        result = {"tokens_per_kind": TOKENS, "quality": quality,
                  "decode_tokens_per_s_at_1k": {k: round(float(np.median(v)), 1) for k, v in speeds.items()}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
