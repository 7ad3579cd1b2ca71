"""GGUF sources: llama.cpp's layout read back exactly, the conversion cache, damaged files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_hf_model, make_tokenizer_files

from edgetok.errors import EdgetokError
from edgetok.exporters.gguf import export_gguf
from edgetok.files import file_sha256
from edgetok.models import gguf_file, sources
from edgetok.models.gguf_file import permute_qk, unpermute_qk
from edgetok.models.llama import LlamaModel
from edgetok.runtimes.kv import ContiguousCache


def test_unpermute_inverts_permute():
    w = np.random.default_rng(0).standard_normal((8 * 16, 24)).astype(np.float32)
    p = permute_qk(w, 8)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute_qk(p, 8), w)


@pytest.fixture(scope="module", params=["llama", "qwen2", "smollm"])
def gguf_pair(request, tmp_path_factory):
    """A tiny HF model of one family and the GGUF edgetok writes from it (f32)."""
    folder = tmp_path_factory.mktemp(request.param)
    make_tokenizer_files(folder)
    from tokenizers import Tokenizer

    hf = make_hf_model(request.param, Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size())
    hf.save_pretrained(folder)
    path = export_gguf(sources.load_source(str(folder)), folder / "model.gguf", "f32")
    return hf, path


def test_gguf_round_trip_matches_transformers(gguf_pair):
    hf, path = gguf_pair
    src = sources.load_source(str(path))
    model = LlamaModel.from_state_dict(src.config, src.weights)
    ids = torch.randint(0, src.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    c = src.config
    with torch.no_grad():
        got = model(ids, ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim), last=None)
        want = hf(ids).logits
    assert (got - want).abs().max().item() < 1e-4


def test_transformers_reads_edgetok_gguf(gguf_pair):
    """The written file follows llama.cpp's conventions: transformers' GGUF loader agrees."""
    from transformers import AutoModelForCausalLM

    hf, path = gguf_pair
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.arange(20)[None]
    with torch.no_grad():
        assert (loaded(ids).logits - hf(ids).logits).abs().max().item() < 1e-4


def test_second_load_reads_the_cache(gguf_pair, monkeypatch):
    _, path = gguf_pair
    first = sources.load_source(str(path))
    monkeypatch.setattr(gguf_file, "read_gguf", lambda *a, **k: pytest.fail("converted again"))
    second = sources.load_source(str(path))
    assert second.config == first.config
    assert all(torch.equal(first.weights[k], second.weights[k]) for k in first.weights)
    assert second.tokenizer.encode("hello 12") == first.tokenizer.encode("hello 12")


def test_damaged_cache_entry_is_rebuilt(gguf_pair):
    _, path = gguf_pair
    sources.load_source(str(path))
    entries = [e for e in (sources.edgetok_home() / "converted").iterdir() if file_sha256(path)[:24] in e.name]
    assert len(entries) == 1
    (entries[0] / "model.safetensors").write_bytes(b"garbage")
    again = sources.load_source(str(path))
    assert again.config.num_layers == 2
    assert (entries[0] / "model.safetensors").stat().st_size > 1000


def overwrite_in_place(path, at: float = 0.5) -> None:
    """Other bytes at the same place, the size unchanged (what a header check cannot see)."""
    with open(path, "r+b") as f:
        size = f.seek(0, 2)
        f.seek(int(size * at))
        f.write(bytes(range(64)))


def test_cache_entry_overwritten_in_place_is_rebuilt_not_used(gguf_pair):
    """Its header intact, its tensors zeroed: once 16 × token 0; now the entry's hash refuses it."""
    _, path = gguf_pair
    first = sources.load_source(str(path))
    want = {k: v.clone() for k, v in first.weights.items()}
    (entry,) = [e for e in (sources.edgetok_home() / "converted").iterdir() if file_sha256(path)[:24] in e.name]
    overwrite_in_place(entry / "model.safetensors")
    again = sources.load_source(str(path))
    assert all(torch.equal(again.weights[k], want[k]) for k in want)
    recorded = json.loads((entry / sources.ENTRY_META).read_text())["sha256"]
    assert file_sha256(entry / "model.safetensors") == recorded["model.safetensors"]  # rebuilt


def test_exported_gguf_is_checked_against_its_report(tiny_folder, tmp_path):
    """The report records the GGUF's hash: a file changed after export is refused, in one sentence;
    the report names its source relative to itself, not by the writer's absolute path."""
    from conftest import run_cli

    out = tmp_path / "out" / "m.gguf"
    r = run_cli("export", tiny_folder, "--format", "gguf", "--no-verify", "-o", out)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "out" / "m.gguf.json").read_text())
    assert report["sha256"] == file_sha256(out) and oct(out.stat().st_mode & 0o777) == "0o644"
    assert str(tmp_path) not in json.dumps(report["source"]) and report["source"]["path"] == "../../" + tiny_folder.name
    assert sources.load_source(str(out)).config.num_layers == 2
    overwrite_in_place(out, 0.9)
    r = run_cli("run", out, "-p", "hi", "-n", "2")
    assert r.exit_code == 1 and "m.gguf does not match the SHA-256 recorded in its report" in r.stderr, r.output
    (tmp_path / "out" / "m.gguf.json").unlink()  # a GGUF shared without its report runs as any GGUF
    assert run_cli("run", out, "-p", "hi", "-n", "2").exit_code == 0


def test_truncated_gguf_is_refused(gguf_pair, tmp_path):
    _, path = gguf_pair
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(EdgetokError, match="damaged GGUF"):
        sources.load_source(str(bad))


def test_gguf_of_unsupported_architecture(tmp_path):
    import gguf

    w = gguf.GGUFWriter(tmp_path / "x.gguf", "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(EdgetokError, match="unsupported architecture 'mamba'"):
        sources.load_source(str(tmp_path / "x.gguf"))


def test_export_refuses_overwrite_and_leaves_nothing_half_written(gguf_pair, tmp_path):
    _, path = gguf_pair
    src = sources.load_source(str(path))
    out = tmp_path / "out.gguf"
    out.write_text("keep me")
    with pytest.raises(EdgetokError, match="--force"):
        export_gguf(src, out, "q8_0")
    assert out.read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]


def test_hf_folder_errors(tmp_path):
    with pytest.raises(EdgetokError, match="no config.json"):
        sources.load_source(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(EdgetokError, match="unsupported architecture 'gpt2'"):
        sources.load_source(str(tmp_path))
    (tmp_path / "w.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(EdgetokError, match="bare safetensors"):
        sources.load_source(str(tmp_path / "w.safetensors"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(EdgetokError, match="not a model"):
        sources.load_source(str(tmp_path / "notes.txt"))
    with pytest.raises(EdgetokError, match="not found"):
        sources.load_source(str(tmp_path / "missing"))


def test_export_from_python_writes_what_it_returns_or_nothing(tiny_folder, tmp_path):
    """The pipeline without the command line: GgufOptions in, the report written beside the file
    out; a verification over max_kl leaves no file behind."""
    from edgetok.exporters.options import GgufOptions
    from edgetok.exporters.pipeline import export

    m = export(GgufOptions(model=str(tiny_folder), output=tmp_path / "m.gguf", quant="q4_0", eval_tokens=32))
    assert m.to_json() == json.loads((tmp_path / "m.gguf.json").read_text())
    assert m.parity.tokens == 32 and m.size_bytes == (tmp_path / "m.gguf").stat().st_size
    assert list(m.kept_at_higher_precision.values()) == ["q8_0"]  # the output projection, as llama.cpp keeps it
    with pytest.raises(EdgetokError, match="exceeds --max-kl 0.0 .*; nothing was written"):
        export(GgufOptions(model=str(tiny_folder), output=tmp_path / "strict.gguf", quant="q4_0", eval_tokens=32, max_kl=0.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.gguf.json"]
