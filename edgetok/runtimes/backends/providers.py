"""ONNX Runtime's execution providers as `--provider` names them: defined once, for the backend,
the CLI and the device profiles (importing this module loads neither torch nor onnxruntime)."""

from __future__ import annotations

import sys

from edgetok.errors import EdgetokError

# --provider → (ONNX Runtime's name, the package that brings it)
PROVIDERS = {
    "cpu": ("CPUExecutionProvider", "onnxruntime"),
    "cuda": ("CUDAExecutionProvider", "onnxruntime-gpu"),
    "dml": ("DmlExecutionProvider", "onnxruntime-directml"),
    "coreml": ("CoreMLExecutionProvider", "onnxruntime (macOS build)"),
    "qnn": ("QNNExecutionProvider", "onnxruntime-qnn"),
    "openvino": ("OpenVINOExecutionProvider", "onnxruntime-openvino"),
}
AUTO_ORDER = ("cuda", "dml", "coreml", "qnn", "openvino")


def choose_provider(provider: str) -> str:
    """--provider → an available ONNX Runtime execution provider, or one clear error."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider == "auto":
        for p in AUTO_ORDER:
            if PROVIDERS[p][0] in available:
                return PROVIDERS[p][0]
        print("edgetok: warning: no accelerator execution provider is available; running on CPU", file=sys.stderr)
        return PROVIDERS["cpu"][0]
    if provider not in PROVIDERS:
        raise EdgetokError(f"unknown --provider '{provider}' (choose from auto, {', '.join(PROVIDERS)})")
    name, package = PROVIDERS[provider]
    if name not in available:
        raise EdgetokError(
            f"the {provider} execution provider is not available in this onnxruntime "
            f"(it has {', '.join(available)}); install {package} in place of onnxruntime"
        )
    return name
