"""The bit-budget allocator (exporters/allocate.py): each matrix's type from its measured
sensitivity, for a size (--target-bits) or a quality (--max-kl), in GGUF and in ONNX."""

from __future__ import annotations

import json

import gguf
import numpy as np
import onnx
import pytest
import torch
from conftest import run_cli

from edgetok.errors import EdgetokError
from edgetok.exporters.allocate import by_bits, by_kl, candidates, greedy_by_bits, ladder, upgrades
from edgetok.exporters.calibration import calibration_tokens
from edgetok.exporters.gguf import tensor_layout
from edgetok.exporters.gguf_types import bits_per_weight, input_rounding, round_trip
from edgetok.exporters.options import GgufOptions, OnnxOptions
from edgetok.exporters.sensitivity import Matrix, Mix, Rounded
from edgetok.models.manifest import ONNX_MANIFEST
from edgetok.models.sources import load_source

BITS = {"a": 4.0, "b": 5.0, "c": 6.0, "d": 8.0}


def bits_of(m: Matrix, kind: str) -> float:
    return BITS[kind]


def test_ladder_keeps_the_lower_convex_hull():
    m = Matrix("x", ("x",), 10, tuple(BITS))
    # b removes less per bit than going straight to c: off the hull; d removes nothing more than c
    assert ladder(m, {"a": 1.0, "b": 0.9, "c": 0.2, "d": 0.2}, bits_of) == ["a", "c"]
    assert ladder(m, {"a": 1.0, "b": 0.4, "c": 0.2, "d": 0.1}, bits_of) == ["a", "b", "c", "d"]


def random_sensitivities(seed: int = 0, count: int = 40):
    g = np.random.default_rng(seed)
    matrices = [Matrix(f"m{i}", (f"m{i}",), int(g.integers(100, 5000)), tuple(BITS)) for i in range(count)]
    kl = {}
    for m in matrices:
        base = g.uniform(0.01, 1)
        kl[m.name] = {k: base * np.exp(-g.uniform(0.5, 1.5) * (b - 4)) for k, b in BITS.items()}
    return matrices, kl


def prefix_rule(matrices, kl, target: float) -> dict[str, str]:
    """The rule by_bits replaced: the steepest upgrades in order, stopping at the first that does not fit."""
    start, steps = upgrades(matrices, kl, bits_of)
    types, left = dict(start), target * sum(m.size for m in matrices) - sum(BITS[start[m.name]] * m.size for m in matrices)
    for u in steps:
        if u.bits > left + 1e-9:
            break
        types[u.matrix], left = u.to, left - u.bits
    return types


def test_a_step_that_does_not_fit_leaves_the_cheaper_ones_after_it():
    """One large matrix's upgrade is the steepest but does not fit: the small matrices' upgrades
    after it still do (stopping there left 1.6 of the 2 spare bits per weight unused)."""
    big, small = Matrix("big", ("big",), 800, ("a", "d")), [Matrix(f"s{i}", (f"s{i}",), 100, ("a", "b", "c")) for i in range(2)]
    kl = {"big": {"a": 10.0, "d": 0.0}}  # 3200 bits, 0.0031 KL per bit
    kl |= {m.name: {"a": 0.2, "b": 0.05, "c": 0.0} for m in small}  # 0.0015 then 0.0005 per bit: 100 bits each
    matrices = [big, *small]
    types = by_bits(matrices, kl, bits_of, 6.0)  # 2 bits per weight over the 1000 weights: 2000 bits to spend
    assert types == {"big": "a", "s0": "c", "s1": "c"}
    assert prefix_rule(matrices, kl, 6.0) == {"big": "a", "s0": "a", "s1": "a"}
    # a ladder is climbed in order: with room for one rung of each small matrix, no second rung
    assert by_bits(matrices, kl, bits_of, 4.2) == {"big": "a", "s0": "b", "s1": "b"}


def test_allocation_fills_the_budget():
    """Random sensitivities, many targets: the realised bits never pass the target, no matrix's next
    rung would still fit, and the predicted KL is never above the old rule's (whose upgrades it keeps)."""
    matrices, kl = random_sensitivities()
    total = sum(m.size for m in matrices)
    start, steps = upgrades(matrices, kl, bits_of)
    for target in np.linspace(4, 8, 33):
        types = by_bits(matrices, kl, bits_of, float(target))
        used = sum(BITS[types[m.name]] * m.size for m in matrices)
        assert used <= target * total + 1e-9
        assert all(used + u.bits > target * total for u in steps if types[u.matrix] == u.below)
        old, greedy = prefix_rule(matrices, kl, float(target)), greedy_by_bits(matrices, kl, bits_of, float(target))
        assert all(BITS[greedy[n]] >= BITS[old[n]] for n in types)
        predicted = sum(kl[n][t] for n, t in types.items())
        assert predicted <= sum(kl[n][t] for n, t in greedy.items()) <= sum(kl[n][t] for n, t in old.items()) + 1e-12
    # 8 bits: every matrix at the top of its ladder (the type of least KL)
    assert all(types[m.name] == min(kl[m.name], key=kl[m.name].get) for m in matrices)
    with pytest.raises(EdgetokError, match="below the smallest mix"):
        by_bits(matrices, kl, bits_of, 3.5)


def test_one_large_step_worth_more_than_the_small_ones_is_taken():
    """A big matrix whose one step removes most of the KL, less steeply than small steps that fill
    the budget first: greedy by KL per bit leaves it out, by_bits takes it."""
    big = Matrix("big", ("big",), 6000, ("a", "d"))
    small = [Matrix(f"s{i}", (f"s{i}",), 1000, ("a", "b")) for i in range(4)]
    kl = {"big": {"a": 1.0, "d": 0.0}} | {m.name: {"a": 0.1, "b": 0.0} for m in small}
    target = (6000 * 4 + 4000 * 4 + 6000 * 4) / 10000  # room for the big step alone, or the small ones
    greedy = greedy_by_bits([big, *small], kl, bits_of, target)
    assert greedy["big"] == "a" and all(greedy[m.name] == "b" for m in small)
    assert by_bits([big, *small], kl, bits_of, target)["big"] == "d"


def test_candidates_fit_the_budget_differ_and_come_lowest_predicted_first():
    matrices, kl = random_sensitivities(2)
    total = sum(m.size for m in matrices)
    mixes = candidates(matrices, kl, bits_of, 5.3)
    predicted = [sum(kl[n][t] for n, t in types.items()) for types in mixes]
    assert len(mixes) > 1 and mixes[0] == by_bits(matrices, kl, bits_of, 5.3) and predicted == sorted(predicted)
    assert len({tuple(sorted(t.items())) for t in mixes}) == len(mixes)
    assert all(sum(BITS[t[m.name]] * m.size for m in matrices) <= 5.3 * total + 1e-6 for t in mixes)
    assert greedy_by_bits(matrices, kl, bits_of, 5.3) in mixes


def test_max_kl_takes_the_least_budget_whose_mix_meets_it():
    """by_kl chooses as greedy_by_bits does: its mix is by_bits' at the bits it uses, predicted under the
    limit when the prediction holds, and a smaller budget's mix is not; a measurement over the limit
    buys more bits."""
    matrices, kl = random_sensitivities(1)
    total = sum(m.size for m in matrices)
    predicted = lambda types: sum(kl[n][t] for n, t in types.items())  # noqa: E731
    limit = predicted(greedy_by_bits(matrices, kl, bits_of, 5.3))
    types, measured = by_kl(matrices, kl, bits_of, limit, predicted)
    bits = sum(BITS[types[m.name]] * m.size for m in matrices) / total
    assert measured <= limit and bits <= 5.3 + 1e-9 and greedy_by_bits(matrices, kl, bits_of, bits) == types
    assert predicted(greedy_by_bits(matrices, kl, bits_of, bits - 0.01)) > limit
    pessimistic, seen = (lambda t: 1.5 * predicted(t)), []  # additivity optimistic by half
    types, measured = by_kl(matrices, kl, bits_of, limit, lambda t: seen.append(t) or pessimistic(t))
    assert measured <= limit and len(seen) > 1
    assert sum(BITS[types[m.name]] * m.size for m in matrices) / total > bits


def file_types(path) -> dict[str, tuple[str, int]]:
    """The GGUF's weight matrices: llama.cpp name → (type, weights)."""
    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name.lower(), int(np.prod(t.shape))) for t in reader.tensors if len(t.shape) == 2}


def test_gguf_target_bits(wide_folder, tmp_path):
    plans = {}
    for target in (4.6, 5.6, 7.0):
        out = tmp_path / f"t{target}.gguf"
        r = run_cli("export", wide_folder, "--format", "gguf", "--target-bits", target, "--calib-tokens", "64",
                    "--eval-tokens", "64", "-o", out)
        assert r.exit_code == 0, r.output
        assert f"allocated for --target-bits {target:g}" in r.output and "tensor types:" in r.output
        report = json.loads((tmp_path / f"t{target}.gguf.json").read_text())
        assert report["quant"] == "auto" and report["parity"]["kl_mean"] < 0.05
        types = file_types(out)  # what llama.cpp reads, not what the report says
        realised = sum(bits_per_weight(kind) * n for kind, n in types.values()) / sum(n for _, n in types.values())
        assert realised <= target and abs(realised - report["allocation"]["bits_per_weight"]) < 1e-4
        plans[target] = types
    low, mid, high = plans.values()
    for name in low:
        assert bits_per_weight(low[name][0]) <= bits_per_weight(mid[name][0]) <= bits_per_weight(high[name][0])
    assert len({kind for kind, _ in mid.values()}) > 1  # a mix, not one type


def calibration_kl(source, gguf_path, n: int) -> float:
    """The written file's KL against the fp32 model on the allocator's calibration tokens, in torch
    from the blocks as gguf-py decodes them (llama.cpp's values), each matrix's input rounded as
    llama.cpp rounds it for the matrix's type (test_gguf_types checks that model against llama.cpp)."""
    tokens = calibration_tokens(source.tokenizer, None, n, n)[0].tolist()
    back = load_source(str(gguf_path))
    kinds = {gg: kind for gg, (kind, _) in file_types(gguf_path).items()}
    matrices = {hf: kinds[gg] for gg, hf in tensor_layout(back.config, back.weights).items() if gg in kinds}
    return Rounded(source, tokens, input_rounding).kl(Mix({hf: back.weights[hf] for hf in matrices}, matrices))


@pytest.mark.parametrize("max_kl", [0.002, 0.0005])
def test_gguf_max_kl_is_met_on_the_calibration_text(wide_folder, tmp_path, max_kl):
    out = tmp_path / "k.gguf"
    # the goal is the calibration text's; the parity report (evaluation text, llama.cpp) is kept as always
    r = run_cli("export", wide_folder, "--format", "gguf", "--quant", "auto", "--max-kl", max_kl,
                "--calib-tokens", "64", "--eval-tokens", "64", "-o", out)
    assert r.exit_code == 0, r.output
    allocation = json.loads((tmp_path / "k.gguf.json").read_text())["allocation"]
    # the sensitivity on --calib-tokens, the mix measured whole on as many tokens as the model's context holds
    assert (allocation["sensitivity_tokens"], allocation["calibration_tokens"]) == (64, 256)
    measured = calibration_kl(load_source(str(wide_folder)), out, 256)
    assert measured <= max_kl
    assert abs(measured - allocation["calibration_kl"]) < 1e-6


def test_gguf_max_kl_buys_bits_only_where_needed(wide_folder, tmp_path):
    loose, tight = tmp_path / "loose.gguf", tmp_path / "tight.gguf"
    for out, kl in ((loose, 0.01), (tight, 0.0005)):
        r = run_cli("export", wide_folder, "--format", "gguf", "--quant", "auto", "--max-kl", kl,
                    "--calib-tokens", "64", "--eval-tokens", "64", "-o", out)
        assert r.exit_code == 0, r.output
    size = lambda p: json.loads(p.with_name(p.name + ".json").read_text())["allocation"]["bits_per_weight"]  # noqa: E731
    assert size(loose) < size(tight)


def test_tensor_type_fixes_what_the_allocator_leaves(wide_folder, tmp_path):
    out = tmp_path / "f.gguf"
    r = run_cli("export", wide_folder, "--format", "gguf", "--target-bits", "5", "--calib-tokens", "64",
                "--no-verify", "--tensor-type", "attn_v=q8_0", "-o", out)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "f.gguf.json").read_text())
    assert file_types(out)["blk.0.attn_v.weight"][0] == "q8_0"
    assert "model.layers.0.self_attn.v_proj.weight" not in report["allocation"]["types"]


def test_a_model_on_q4_1s_grid_gets_q4_1_back_exactly(wide_folder, tmp_path):
    """Weights that already sit on q4_1's grid (SmolLM2's published file is q4_1) cost nothing
    there: at 5 bits the allocator gives every matrix q4_1, and the file holds the source's weights."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "on-grid"
    hf = AutoModelForCausalLM.from_pretrained(wide_folder)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.copy_(round_trip(p.detach(), "q4_1"))
    hf.save_pretrained(folder)
    for f in wide_folder.glob("tokenizer*"):
        (folder / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "q.gguf"
    r = run_cli("export", folder, "--format", "gguf", "--target-bits", "5", "--calib-tokens", "64", "--no-verify", "-o", out)
    assert r.exit_code == 0, r.output
    assert {kind for kind, _ in file_types(out).values()} == {"q4_1"}
    source, back = load_source(str(folder)).weights, load_source(str(out)).weights
    assert all(torch.equal(back[n], w) for n, w in source.items() if w.dim() == 2)


def test_a_gguf_sources_own_types_are_measured_with_the_predicted_mixes(llamacpp_q4_k_m, tmp_path):
    """--target-bits from llama.cpp's Q4_K_M: the mixes predicted lowest and the source's own types
    (they fit) are each measured whole on the calibration text, and the lowest measured is written;
    the tensors at their source's type keep its blocks."""
    source, out = llamacpp_q4_k_m, tmp_path / "auto.gguf"
    own = file_types(source)
    bits = sum(bits_per_weight(kind) * n for kind, n in own.values()) / sum(n for _, n in own.values())
    r = run_cli("export", source, "--format", "gguf", "--target-bits", f"{bits + 1e-3:.4f}", "--calib-tokens", "64",
                "--no-verify", "-o", out)
    assert r.exit_code == 0, r.output
    allocation = json.loads((tmp_path / "auto.gguf.json").read_text())["allocation"]
    tried = {t["origin"]: t for t in allocation["tried"]}
    assert set(tried) == {"predicted", "the source's own types"}
    assert tried["the source's own types"]["bits_per_weight"] == pytest.approx(bits, abs=1e-3)
    assert allocation["calibration_kl"] == min(t["calibration_kl"] for t in allocation["tried"])
    assert any(t["origin"] == allocation["chosen"] and t["calibration_kl"] == allocation["calibration_kl"]
               for t in allocation["tried"])
    written = file_types(out)
    kept = {t["tensor"] for t in json.loads((tmp_path / "auto.gguf.json").read_text())["type_plan"] if t["kept"]}
    assert kept == {n for n in written if written[n][0] == own[n][0]} and kept


def test_gptq_codes_on_the_allocators_types(wide_folder, tmp_path):
    """--target-bits with --method gptq: the allocator chooses each matrix's type first, GPTQ rounds
    each linear onto its type's grid, and the file holds those codes at those types."""
    out = tmp_path / "g.gguf"
    r = run_cli("export", wide_folder, "--format", "gguf", "--target-bits", "5.6", "--method", "gptq",
                "--calib-tokens", "1024", "--eval-tokens", "64", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output[r.output.index("{"):])
    allocated, types = report["allocation"]["types"], file_types(out)
    grids = report["quantization"]["grids"]
    assert sum(grids.values()) == 7 * 2 and len(grids) > 1  # every decoder linear, on more than one type
    plan = {t["tensor"]: t for t in report["type_plan"]}
    assert types["blk.0.attn_q.weight"][0] == allocated["model.layers.0.self_attn.q_proj.weight"]
    assert all(types[t][0] == plan[t]["type"] for t in types)
    assert report["parity"]["kl_mean"] < 0.05
    # the codes are GPTQ's, not the writer's rounding to nearest at the same type
    back, source = load_source(str(out)).weights, load_source(str(wide_folder)).weights
    gridded = [n for n, kind in allocated.items() if ".layers." in n and kind in grids]
    assert gridded and all(not torch.equal(back[n], round_trip(source[n], allocated[n])) for n in gridded)


@pytest.mark.parametrize("make,words", [
    (lambda: GgufOptions(model="m", output="o.gguf", quant="auto"), "needs one goal"),
    (lambda: GgufOptions(model="m", output="o.gguf", quant="auto", target_bits=5, max_kl=0.1), "needs one goal"),
    (lambda: GgufOptions(model="m", output="o.gguf", quant="q4_k", target_bits=5), "use it with --quant auto"),
    (lambda: GgufOptions(model="m", output="o.gguf", target_bits=5, keep_sensitive=True), "already chooses"),
    (lambda: OnnxOptions(model="m", output="o", target_bits=5, method="gptq"), "rounds each matrix to nearest"),
    (lambda: OnnxOptions(model="m", output="o", weights="auto", target_bits=5, qdq=True), "--qdq applies"),
])
def test_allocator_option_mistakes(make, words):
    with pytest.raises(EdgetokError, match=words):
        make()


def test_target_bits_implies_auto():
    assert GgufOptions(model="m", output="o.gguf", target_bits=5).quant == "auto"
    assert OnnxOptions(model="m", output="o", target_bits=5).weights == "auto"
    assert GgufOptions(model="m", output="o.gguf").quant == "q8_0"
    assert OnnxOptions(model="m", output="o").weights == "int4"


def test_target_below_every_mix_is_one_sentence(wide_folder, tmp_path):
    r = run_cli("export", wide_folder, "--format", "gguf", "--target-bits", "3", "--calib-tokens", "64", "-o",
                tmp_path / "x.gguf")
    assert r.exit_code == 1 and "below the smallest mix" in r.output and "Traceback" not in r.output, r.output
    assert not list(tmp_path.iterdir())


def onnx_types(folder) -> dict[str, str]:
    """The graph's weights: initializer → int4 | int8 (MatMulNBits' packed codes) | fp16 (a float matrix)."""
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    hidden = json.loads((folder / ONNX_MANIFEST).read_text())["config"]["hidden_size"]
    bits = {n.input[1]: a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    types = {}
    for t in model.graph.initializer:
        if t.name.endswith(".weight.q"):  # (N, blocks, bytes per block); a Gather-only embedding has K = hidden
            types[t.name.removesuffix(".q")] = f"int{bits.get(t.name, t.dims[1] * t.dims[2] * 8 // hidden)}"
        elif t.name.endswith(".weight.fp16") and len(t.dims) == 2:
            types[t.name.removesuffix(".fp16")] = "fp16"
    return types


def test_onnx_per_tensor_types(tiny_folder, tmp_path):
    order = {"int4": 0, "int8": 1, "fp16": 2}
    plans, kls = [], []
    for target in (5.2, 7.0, 12.0):
        out = tmp_path / f"o{target}"
        r = run_cli("export", tiny_folder, "--format", "onnx", "--target-bits", target, "--calib-tokens", "64",
                    "--eval-tokens", "64", "-o", out)
        assert r.exit_code == 0, r.output
        manifest = json.loads((out / ONNX_MANIFEST).read_text())
        allocation = manifest["allocation"]
        assert manifest["weights"] == "auto" and allocation["bits_per_weight"] <= target
        assert onnx_types(out) == allocation["types"]  # the graph holds what the report says
        plans.append(allocation["types"])
        kls.append(manifest["parity"]["kl_mean"])  # run by ONNX Runtime on the evaluation text
    assert kls[2] < kls[0]
    for lo, hi in zip(plans, plans[1:]):
        assert all(order[hi[n]] >= order[lo[n]] for n in lo)
    assert len(set(plans[1].values())) > 1


def test_keep_sensitive_still_measures(wide_folder, tmp_path):
    """--keep-sensitive reads the same measurement (exporters/sensitivity.py)."""
    out = tmp_path / "s.gguf"
    r = run_cli("export", wide_folder, "--format", "gguf", "--quant", "q4_k", "--keep-sensitive", "--eval-tokens", "64",
                "-o", out)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "s.gguf.json").read_text())
    assert report["sensitivity_kl"] and all(v >= 0 for v in report["sensitivity_kl"].values())
    assert torch.tensor(list(report["sensitivity_kl"].values())).max() > 0
