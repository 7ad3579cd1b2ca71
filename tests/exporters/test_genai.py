"""`edgetok export --format onnx --genai`: folders onnxruntime-genai runs, on tiny random models (and
SmolLM2, slow).

What runs a --genai folder is onnxruntime-genai; edgetok's own run of the same weights is the
export made without --genai (the same codes and graph, edgetok's inputs and outputs, and with
--activations float edgetok's MatMulQ4 and attention kernels). The two must choose the same
greedy tokens, and their logits agree to float rounding.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime_genai as og
import pytest
from conftest import make_hf_model, make_tokenizer_files, run_cli

import edgetok
from edgetok.exporters.genai import GENAI_CONFIG, genai_greedy, genai_logits
from edgetok.models import names
from edgetok.models.sources import load_source
from edgetok.runtimes.backends.onnxruntime import onnx_logits

PROMPT = "The quick brown fox"


def export_pair(source, out, *options: str) -> tuple:
    """The same export twice: edgetok's (no parity report) and --genai's (its report run by
    onnxruntime-genai)."""
    plain, genai = out / "plain", out / "genai"
    r = run_cli("export", source, "--format", "onnx", "-o", plain, "--no-verify", *options)
    assert r.exit_code == 0, r.output
    r = run_cli("export", source, "--format", "onnx", "-o", genai, "--genai", "--eval-tokens", "64", *options)
    assert r.exit_code == 0, r.output
    return plain, genai


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """HF folders: a tiny SmolLM-like Llama (tied embeddings) and a tiny Gemma 3 whose sliding
    window (8) the tests' generations cross."""
    out = {}
    for kind, extra in (("smollm", {}), ("gemma3", dict(layers=6, sliding_window_pattern=6, query_pre_attn_scalar=16))):
        folder = tmp_path_factory.mktemp(f"tiny-{kind}")
        make_tokenizer_files(folder)
        make_hf_model(kind, 400, seed=3, **({"layers": 3} | extra)).save_pretrained(folder)
        out[kind] = folder
    return out


@pytest.fixture(scope="module")
def exact_pair(tiny_models, tmp_path_factory):
    """int4 with float activations: where edgetok's export runs its own kernels and --genai's
    runs ONNX Runtime's on the same codes."""
    return export_pair(tiny_models["smollm"], tmp_path_factory.mktemp("exact"), "--weights", "int4", "--activations", "float")


def test_genai_folder_has_onnxruntime_genai_interface(exact_pair):
    _, folder = exact_pair
    assert {GENAI_CONFIG, "model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json",
            "edgetok.json"} <= {p.name for p in folder.iterdir()}
    config = json.loads((folder / GENAI_CONFIG).read_text())
    decoder = config["model"]["decoder"]
    assert config["search"]["past_present_share_buffer"] is True
    graph = onnx.load(folder / "model.onnx", load_external_data=False).graph
    inputs, outputs = [i.name for i in graph.input], [o.name for o in graph.output]
    layers = decoder["num_hidden_layers"]
    assert inputs == [decoder["inputs"]["input_ids"], decoder["inputs"]["attention_mask"], decoder["inputs"]["position_ids"],
                      *(decoder["inputs"][f"past_{k}_names"] % i for i in range(layers) for k in names.KV_KINDS)]
    assert outputs == [decoder["outputs"]["logits"],
                       *(decoder["outputs"][f"present_{k}_names"] % i for i in range(layers) for k in names.KV_KINDS)]
    assert inputs[3:5] == ["past_key_values.0.key", "past_key_values.0.value"] and outputs[1] == "present.0.key"
    # ONNX Runtime's operators only: onnxruntime-genai cannot load edgetok's library
    assert {n.domain for n in graph.node} <= {"", "com.microsoft"}
    manifest = json.loads((folder / "edgetok.json").read_text())
    assert manifest["genai"] is True and manifest["io"] == {"inputs": inputs, "outputs": outputs}
    assert manifest["parity"]["runtime"].startswith("onnxruntime-genai")


def test_onnxruntime_genai_runs_what_edgetok_runs(exact_pair):
    plain, folder = exact_pair
    model = edgetok.load(str(plain))
    assert model.engine.backend.name == "onnxruntime"
    prompt = model.encode(PROMPT, chat=False)
    want = model.generate(PROMPT, max_new_tokens=24).tokens
    assert len(want) == 24 and genai_greedy(folder, prompt, 24) == want
    # every position's logits, in one prompt pass: float rounding apart (MatMulQ4 and MatMulNBits
    # sum the same products in other orders)
    tokens = list(range(5, 100))
    ours, theirs = onnx_logits(load_source(str(plain)), tokens), genai_logits(folder, tokens)
    assert theirs.shape == ours.shape and (theirs - ours).abs().max().item() < 0.05
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()
    # onnxruntime-genai's tokenizer reads the folder's tokenizer files as edgetok does
    assert list(og.Tokenizer(og.Model(str(folder))).encode(PROMPT)) == prompt


def test_sliding_windows_in_onnxruntime_genai(tiny_models, tmp_path):
    """Gemma 3's sliding layers over onnxruntime-genai's shared buffer: the default int4 export's
    graph is the same as edgetok's, so its logits are too."""
    plain, folder = export_pair(tiny_models["gemma3"], tmp_path, "--weights", "int4")
    model = edgetok.load(str(plain))
    want = model.generate(PROMPT, max_new_tokens=20).tokens
    assert len(want) == 20 and genai_greedy(folder, model.encode(PROMPT, chat=False), 20) == want
    tokens = list(range(5, 40))
    assert np.array_equal(genai_logits(folder, tokens).numpy(), onnx_logits(load_source(str(plain)), tokens).numpy())


def test_genai_refuses_what_it_cannot_honor_and_writes_nothing(tiny_models, exact_pair, tmp_path):
    source = tiny_models["smollm"]
    for args, says in (
        (["--format", "gguf", "-o", tmp_path / "m.gguf"], "--genai apply to --format onnx"),
        (["--format", "hf", "-o", tmp_path / "hf"], "--genai apply to --format onnx"),
        (["--format", "onnx", "--qdq", "-o", tmp_path / "q"], "drop --qdq and --attention standard"),
        (["--format", "onnx", "--attention", "standard", "-o", tmp_path / "s"], "drop --qdq and --attention standard"),
        (["--format", "onnx", "--prune-after-layer", "1", "-o", tmp_path / "p"], "drop --prune-after-layer"),
    ):
        r = run_cli("export", source, "--genai", *args)
        assert r.exit_code == 1, r.output
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and says in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []
    # edgetok's backend names what runs the folder instead of failing on its inputs
    r = run_cli("run", exact_pair[1], "-p", "hi")
    assert r.exit_code == 1 and "exported with --genai for onnxruntime-genai" in r.output


@pytest.mark.slow
def test_smollm2_genai_export_greedy_matches_edgetok(tmp_path):
    """SmolLM2 int4 with float activations: onnxruntime-genai's greedy tokens of chat prompts are
    edgetok's (BENCHMARKS.md: the agreement measured)."""
    plain, folder = export_pair("smollm2", tmp_path, "--activations", "float")
    model = edgetok.load(str(plain))
    genai_tokenizer = og.Tokenizer(og.Model(str(folder)))
    for question in ("What is the capital of France? Answer in one sentence.", "Write a haiku about the sea."):
        prompt = model.encode(question, chat=True)
        messages = json.dumps([{"role": "user", "content": question}])
        assert list(genai_tokenizer.encode(genai_tokenizer.apply_chat_template(messages, add_generation_prompt=True))) == prompt
        want = model.generate(question, chat=True, max_new_tokens=32).tokens
        assert genai_greedy(folder, prompt, 32) == want
    parity = json.loads((folder / "edgetok.json").read_text())["parity"]
    assert parity["top1_agreement"] >= 0.95
