"""Write a model as a Hugging Face folder (config.json, model.safetensors, tokenizer files).

Peers that start from an HF folder (transformers, onnxruntime-genai's model builder) get the very
weights edgetok runs, even when the model came as a GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from edgetok.files import atomic_folder
from edgetok.models.checkpoint import fuse
from edgetok.models.names import LM_HEAD, ROPE_FREQS
from edgetok.models.sources import Source


def export_hf_folder(source: Source, out: Path, force: bool = False) -> Path:
    """Write into a temporary folder beside `out`, then rename it into place."""
    with atomic_folder(out, force, marker="config.json") as tmp:
        write_model_files(source, tmp)
        weights = {k: v.contiguous() for k, v in source.weights.items() if k != ROPE_FREQS}
        if source.config.tie_word_embeddings:
            weights.pop(LM_HEAD, None)
        weights = fuse(weights, source.config)  # the family's own layout (Phi-3 stacks q/k/v, gate/up)
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
    return out


def write_model_files(source: Source, folder: Path) -> None:
    """config.json, the tokenizer files and generation_config.json: what HF tools read beside weights."""
    cfg, tok = source.config, source.tokenizer
    (folder / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    tok.tok.save(str(folder / "tokenizer.json"))
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token or None,
        "eos_token": tok.eos_token or None,
        "chat_template": tok.chat_template,
        "model_max_length": cfg.max_context,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    eos = cfg.eos_token_ids
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": cfg.bos_token_id, "eos_token_id": eos}))
