"""Write a model as a Hugging Face folder (config.json, model.safetensors, tokenizer files).

Peers that start from an HF folder (transformers, onnxruntime-genai's model builder) get the very
weights edgetok runs, even when the model came as a GGUF.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from edgetok.errors import EdgetokError
from edgetok.models.sources import Source


def export_hf_folder(source: Source, out: Path, force: bool = False) -> Path:
    """Write into a temporary folder beside `out`, then rename it into place."""
    if out.exists() and not force:
        raise EdgetokError(f"{out} exists; pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        cfg = source.config
        weights = {k: v.contiguous() for k, v in source.weights.items() if k != "rope_freqs"}
        if cfg.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        save_file(weights, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
        tok = source.tokenizer
        tok.tok.save(str(tmp / "tokenizer.json"))
        tcfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tok.bos_token or None,
            "eos_token": tok.eos_token or None,
            "chat_template": tok.chat_template,
            "model_max_length": cfg.max_context,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
        eos = cfg.eos_token_ids
        (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": cfg.bos_token_id, "eos_token_id": eos}))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
