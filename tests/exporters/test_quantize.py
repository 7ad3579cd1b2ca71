"""Weight quantization: codes and packing, GPTQ, rotations, layer-wise calibration, GGUF blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_hf_model, make_tokenizer_files, run_cli

from edgetok.exporters import kquants
from edgetok.exporters.calibration import _Attention, attention_importance
from edgetok.exporters.gguf import export_gguf, gguf_blocks
from edgetok.exporters.quantize import (
    LINEARS,
    QuantizedWeight,
    _gptq,
    fit_group_size,
    gptq,
    gptq_as,
    grid,
    layer_error,
    quantize_model,
    rtn,
)
from edgetok.exporters.rotation import hadamard, random_orthogonal, rotate
from edgetok.models import sources
from edgetok.models.config import ModelConfig
from edgetok.models.llama import LlamaModel, rope_cos_sin
from edgetok.runtimes.kv import ContiguousCache
from edgetok.texts import essays


def correlated_layer(n=96, k=256, tokens=2048, seed=0):
    """A random weight and inputs with correlated features (as a real layer's activations are)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    mix = torch.randn(k, k, generator=gen) / k**0.5
    scales = torch.linspace(0.1, 3, k)  # some channels far larger than others
    x = (torch.randn(tokens, k, generator=gen) @ mix + 0.1 * torch.randn(tokens, k, generator=gen)) * scales
    return w, x


# -- codes and packing ----------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, 32, True), (8, 32, True), (4, 128, False), (2, 16, False)])
def test_rtn_codes_round_trip(bits, group, sym):
    w, _ = correlated_layer()
    qw = rtn(w, bits, group, sym)
    assert qw.q.dtype == torch.uint8 and int(qw.q.max()) < 1 << bits
    # Each code is the nearest level: the error is at most half a step (none clipped here).
    step = qw.scale.repeat_interleave(group, 1)
    err = (qw.dequantize() - w).abs()
    clipped = (qw.q == 0) | (qw.q == (1 << bits) - 1)
    assert (err[~clipped] <= step[~clipped] / 2 + 1e-6).all()
    # Requantizing the dequantized weight on its own grid gives the same codes.
    again = (qw.dequantize().view(w.shape[0], -1, group) / qw.scale[..., None] + qw.zero[..., None].float()).round()
    assert torch.equal(again.reshape(w.shape).to(torch.uint8), qw.q)


def test_rows_and_cat_rows_round_trip():
    w, _ = correlated_layer()
    qw = rtn(w, 4, 32)
    parts = [qw.rows(slice(0, 40)), qw.rows(slice(40, 96))]
    back = QuantizedWeight.cat_rows(parts)
    assert torch.equal(back.q, qw.q) and torch.equal(back.scale, qw.scale) and torch.equal(back.zero, qw.zero)
    perm = torch.randperm(96)
    assert torch.equal(qw.rows(perm).dequantize(), qw.dequantize()[perm])


def test_fp16_scales_are_fp16_values():
    w, _ = correlated_layer()
    qw = rtn(w, 4, 32, True, scale_dtype=torch.float16)
    assert torch.equal(qw.scale.half().float(), qw.scale)


def test_fit_group_size():
    assert fit_group_size(576, 32) == 32
    assert fit_group_size(576, 128) == 64  # SmolLM2's hidden size
    assert fit_group_size(1536, 128) == 128
    with pytest.raises(ValueError):
        fit_group_size(100, 64)


@pytest.mark.parametrize("quant,bits", [("q4_0", 4), ("q5_0", 5), ("q8_0", 8)])
def test_gguf_blocks_dequantize_exactly(quant, bits):
    """gguf-py's own dequantize of the written blocks equals QuantizedWeight.dequantize()."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    w, x = correlated_layer(k=256)
    for qw in (rtn(w, bits, 32, True, torch.float16),
               gptq(w, 2 * x.T @ x, bits, 32, True, scale_dtype=torch.float16, act_order=True)):
        blocks = gguf_blocks(qw, quant)
        got = dequantize(blocks, GGMLQuantizationType[quant.upper()])
        np.testing.assert_array_equal(got.reshape(w.shape), qw.dequantize().numpy())


def test_q4_0s_own_grid_is_llama_cpps_rounding():
    """signed_scale: round to nearest on it writes llama.cpp's q4_0 scales (gguf-py's port of its
    quantizer: each block's largest-magnitude weight over −8, negative ones included) and its codes
    but where llama.cpp rounds with the unrounded scale and stores it in fp16 — we round on the fp16
    scale stored, one step apart in a few codes, never farther from the weight; GPTQ on that grid keeps
    its blocks there and beats it on the layer's output."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    w, x = correlated_layer(k=256)
    ours = rtn(w, 4, 32, True, torch.float16, signed_scale=True)
    assert (ours.scale < 0).any() and (ours.scale > 0).any()
    mine = gguf_blocks(ours, "q4_0").reshape(-1, 18)
    theirs = quantize(w.numpy(), GGMLQuantizationType.Q4_0).reshape(-1, 18)
    np.testing.assert_array_equal(mine[:, :2], theirs[:, :2])  # the fp16 scales
    codes = [np.concatenate([b[:, 2:] & 15, b[:, 2:] >> 4], 1).astype(int) for b in (mine, theirs)]
    assert np.abs(codes[0] - codes[1]).max() <= 1 and (codes[0] != codes[1]).mean() < 0.005
    kind = GGMLQuantizationType.Q4_0
    ours_err = np.abs(dequantize(mine.reshape(w.shape[0], -1), kind).reshape(w.shape) - w.numpy())
    their_err = np.abs(dequantize(theirs.reshape(w.shape[0], -1), kind).reshape(w.shape) - w.numpy())
    assert (ours_err <= their_err + 1e-7).all()
    calib, held_out = x[:1536], x[1536:]
    h = 2 * calib.T @ calib / len(calib)
    q = gptq(w, h, 4, 32, True, scale_dtype=torch.float16, signed_scale=True)
    blocks = gguf_blocks(q, "q4_0")
    np.testing.assert_array_equal(dequantize(blocks, GGMLQuantizationType.Q4_0).reshape(w.shape), q.dequantize().numpy())
    assert layer_error(w, q, held_out) < 0.8 * layer_error(w, ours, held_out)
    # and its 16 levels fit better than the ±absmax grid's 15 on the same layer, by round to nearest
    assert layer_error(w, ours, held_out) < layer_error(w, rtn(w, 4, 32, True, torch.float16), held_out)


@pytest.mark.parametrize("kind", kquants.TYPES)
def test_gptq_on_a_gguf_types_grid_writes_its_codes_exactly(kind):
    """GPTQ rounds each column onto the grid fitted first (kquants.fit, weighted by the Hessian's
    diagonal): the blocks decode — as gguf-py and llama.cpp decode them — to exactly the values
    GPTQ computed its errors with, the grid's scales and mins are the fitted ones, and the codes
    are the ones chosen (gguf_codes reads them back where it carries the type)."""
    from gguf import GGMLQuantizationType

    from edgetok.exporters import gguf_codes

    w, x = correlated_layer(n=64, k=512)
    h = 2 * x.T @ x / len(x)
    codes, fixed = _gptq(w, h, lambda W: kquants.fit(W, kind, h.diagonal().float()), 0.01, 128, False)
    blocks = fixed.blocks(codes)
    assert isinstance(blocks, kquants.Blocks) and blocks.shape == tuple(w.shape)
    assert torch.equal(blocks.dequantize(), fixed.values(codes))
    refit = kquants.fit(w, kind, h.diagonal().float())  # the grid is the weights', fixed before any column
    assert torch.equal(refit.scale, fixed.scale) and torch.equal(refit.offset, fixed.offset)
    assert torch.equal(gptq_as(w, h, kind).dequantize(), blocks.dequantize())
    qtype = GGMLQuantizationType[kind.upper()]
    if qtype in gguf_codes.DECODERS:
        back = gguf_codes.decode(blocks.data, qtype, tuple(w.shape))
        assert torch.equal(back.q, codes)
    assert not torch.equal(codes, fixed.nearest(w))  # GPTQ moved codes off the nearest level


@pytest.mark.parametrize("kind", kquants.TYPES)
def test_gptq_beats_round_to_nearest_on_a_gguf_types_grid(kind):
    """On a layer with correlated inputs, GPTQ's codes on the type's grid have less output error
    (on held-out inputs) than round to nearest on the same grid, and than llama.cpp-style rounding
    (kquants' own, no importance)."""
    w, x = correlated_layer(n=64, k=512, tokens=3072)
    calib, held_out = x[:2048], x[2048:]
    h = 2 * calib.T @ calib / len(calib)
    fixed = kquants.fit(w, kind, h.diagonal().float())
    nearest = fixed.blocks(fixed.nearest(w))
    plain = kquants.Blocks(kind, kquants.quantize_rows(w, kind))
    ours = gptq_as(w, h, kind)
    assert layer_error(w, ours, held_out) < 0.92 * layer_error(w, nearest, held_out)  # 10–15 % less here
    assert layer_error(w, ours, held_out) < 0.92 * layer_error(w, plain, held_out)


def test_blocks_rows_and_cat_rows_round_trip():
    w, _ = correlated_layer(n=64, k=512)
    b = kquants.Blocks("q4_k", kquants.quantize_rows(w, "q4_k"))
    np.testing.assert_array_equal(kquants.Blocks.cat_rows([b.rows(slice(0, 20)), b.rows(slice(20, 64))]).data, b.data)
    perm = torch.randperm(64)
    assert torch.equal(b.rows(perm).dequantize(), b.dequantize()[perm])
    with pytest.raises(ValueError, match="share one type"):
        kquants.Blocks.cat_rows([b, kquants.Blocks("q6_k", kquants.quantize_rows(w, "q6_k"))])


def test_gguf_blocks_refuse_codes_that_do_not_fit():
    w, _ = correlated_layer()
    with pytest.raises(ValueError, match="symmetric"):
        gguf_blocks(rtn(w, 4, 32, False, torch.float16), "q4_0")
    with pytest.raises(ValueError, match="groups of 32"):
        gguf_blocks(rtn(w, 4, 64, True, torch.float16), "q4_0")
    with pytest.raises(ValueError, match="fp16"):
        gguf_blocks(rtn(w, 4, 32, True), "q4_0")


# -- GPTQ -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("group,sym", [(32, False), (128, False), (32, True), (128, True)])
def test_gptq_reduces_layer_output_error(group, sym):
    w, x = correlated_layer()
    calib, held_out = x[:1536], x[1536:]
    h = 2 * calib.T @ calib / len(calib)
    base = rtn(w, 4, group, sym)
    for act_order in (False, True):
        q = gptq(w, h, 4, group, sym, act_order=act_order)
        assert layer_error(w, q, calib) < 0.75 * layer_error(w, base, calib)
        assert layer_error(w, q, held_out) < 0.8 * layer_error(w, base, held_out)


def test_gptq_with_uncorrelated_inputs_is_rtn():
    """With H ∝ I no error is passed on, and the grid is rtn's: the same codes."""
    w, _ = correlated_layer()
    for sym in (False, True):
        q, r = gptq(w, torch.eye(256), 4, 32, sym), rtn(w, 4, 32, sym)
        assert torch.equal(q.q, r.q) and torch.equal(q.scale, r.scale) and torch.equal(q.zero, r.zero)


def test_act_order_gives_a_plain_quantized_weight():
    w, x = correlated_layer()
    q = gptq(w, 2 * x.T @ x, 4, 32, act_order=True)
    assert q.shape == w.shape and q.q.dtype == torch.uint8 and int(q.q.max()) <= 15
    # Static groups: each contiguous group of original columns keeps rtn's grid of the original weight.
    scale, zero = grid(w.view(96, -1, 32), 4, False)
    assert torch.equal(q.scale, scale) and torch.equal(q.zero, zero)
    assert layer_error(w, q, x) < layer_error(w, rtn(w, 4, 32), x)


def test_gptq_dead_inputs_and_bad_shapes():
    w, x = correlated_layer()
    x[:, 5] = 0  # an input never active in calibration
    q = gptq(w, 2 * x.T @ x, 4, 32)
    assert torch.isfinite(q.dequantize()).all()
    with pytest.raises(ValueError, match="Hessian"):
        gptq(w, torch.eye(128), 4, 32)


# -- rotations ------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [12, 64, 72, 576, 1536])
def test_hadamard(n):
    h = hadamard(n)
    assert h is not None and torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    q = random_orthogonal(n)
    assert (q @ q.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12


def test_random_orthogonal_without_hadamard():
    assert hadamard(9) is None
    q = random_orthogonal(9)
    assert (q @ q.T - torch.eye(9, dtype=torch.float64)).abs().max() < 1e-12


def tiny_config(tied: bool, **kw) -> ModelConfig:
    return ModelConfig(arch="llama", vocab_size=120, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, max_context=128, tie_word_embeddings=tied, **kw)


def random_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = LlamaModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() == 2 else 0.3) + (1 if "norm" in name else 0))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def logits(cfg, weights, ids):
    model = LlamaModel.from_state_dict(cfg, weights)
    with torch.no_grad():
        return model(ids, ContiguousCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, batch=ids.shape[0]), last=None)


@pytest.mark.parametrize("tied,bias", [(True, False), (False, False), (False, True)])
def test_rotation_leaves_the_float_model_unchanged(tied, bias):
    cfg = tiny_config(tied, qkv_bias=bias, o_bias=bias, mlp_bias=bias)
    w = random_weights(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    rotated, rcfg = rotate(w, cfg)
    assert not torch.allclose(rotated["model.layers.0.self_attn.q_proj.weight"], w["model.layers.0.self_attn.q_proj.weight"])
    assert (logits(rcfg, rotated, ids) - logits(cfg, w, ids)).abs().max().item() <= 1e-4
    assert torch.equal(rotated["model.norm.weight"], torch.ones(cfg.hidden_size))
    # A tied head with a non-trivial final norm weight becomes its own tensor.
    assert rcfg.tie_word_embeddings is False and "lm_head.weight" in rotated


def test_rotation_keeps_a_tie_it_can_keep():
    cfg = tiny_config(True)
    w = random_weights(cfg)
    w["model.norm.weight"] = torch.ones(cfg.hidden_size)
    rotated, rcfg = rotate(w, cfg)
    assert rcfg.tie_word_embeddings and "lm_head.weight" not in rotated
    ids = torch.arange(30)[None]
    assert (logits(rcfg, rotated, ids) - logits(cfg, w, ids)).abs().max().item() <= 1e-4


# -- calibration ----------------------------------------------------------------------------------
def test_calibration_attention_matches_the_model():
    """The cache stand-in calibration uses computes the model's attention (with and without
    the probabilities it needs for importance)."""
    cfg = tiny_config(False)
    model = LlamaModel.from_state_dict(cfg, random_weights(cfg))
    x = torch.randn(3, 33, cfg.hidden_size)
    cos, sin = rope_cos_sin(model.inv_freq, torch.arange(33))
    block = model.model.layers[0]
    with torch.no_grad():
        want = block.self_attn(x, cos, sin, 0, ContiguousCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, batch=3))
        for importance in (False, True):
            rec = _Attention(importance, 10.0, cfg.windows)
            assert (block.self_attn(x, cos, sin, 0, rec) - want).abs().max() < 1e-5
        assert rec.importance.shape == (3, 33) and torch.allclose(rec.importance.mean(-1), torch.ones(3))


def test_attention_importance_favours_attended_tokens():
    t = 8
    probs = torch.zeros(1, 1, t, t)
    for q in range(t):
        probs[0, 0, q, : q + 1] = 1 / (q + 1)
    probs[0, 0, 4:, :] *= 0.5
    probs[0, 0, 4:, 3] += 0.5  # token 3 gets half of every later query's attention
    r = attention_importance(probs)
    assert r.argmax().item() == 3 and torch.isclose(r.mean(), torch.tensor(1.0))


@pytest.fixture(scope="module")
def tied_folder(tmp_path_factory):
    """A tiny SmolLM-like HF folder (tied embeddings) with a real tokenizer."""
    from tokenizers import Tokenizer

    folder = tmp_path_factory.mktemp("tiny-smollm")
    make_tokenizer_files(folder)
    hf = make_hf_model("smollm", Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size())
    with torch.no_grad():
        for layer in hf.model.layers:  # non-trivial norms, so folding them matters
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
        hf.model.norm.weight.uniform_(0.5, 1.5)
    hf.save_pretrained(folder)
    return folder


def kl(ref: torch.Tensor, test: torch.Tensor) -> float:
    p = ref.double().log_softmax(-1)
    return (p.exp() * (p - test.double().log_softmax(-1))).sum(-1).mean().item()


def test_quantize_model(tied_folder):
    """rtn, gptq and rsq on a tiny SmolLM-like model, evaluated on text held out from calibration."""
    src = sources.load_source(str(tied_folder))
    ids = torch.tensor(src.tokenizer.encode(essays(2000))[:96])[None]  # the start; calibration reads the end
    ref = logits(src.config, src.weights, ids)
    names = [f"model.layers.{i}.{lin}.weight" for i in range(src.config.num_layers) for lin in LINEARS]
    error = {}
    for method in ("rtn", "gptq", "rsq"):
        qm = quantize_model(src, 4, 32, method, calib_tokens=2048, seq_len=128, symmetric=True)
        assert all(isinstance(qm.weights[n], QuantizedWeight) for n in names)
        assert qm.rotated == (method == "rsq")
        assert qm.config.tie_word_embeddings == (method != "rsq")  # rotation unties SmolLM's head
        error[method] = kl(ref, logits(qm.config, qm.dequantized(), ids))
        if method != "rtn":
            assert qm.info["calibration_tokens"] == 2048 and qm.info["calibration_sequences"] == 16
            # The float model the codes approximate is the source's own, up to the rotation.
            assert (logits(qm.config, qm.reference, ids) - ref).abs().max() < 1e-4
    print(error)
    assert error["gptq"] < error["rtn"] and error["rsq"] < error["rtn"]


def test_gguf_export_writes_the_codes_exactly(tied_folder, tmp_path):
    """A GGUF written from rsq codes reads back (through gguf-py) as exactly the dequantized codes."""
    src = sources.load_source(str(tied_folder))
    from edgetok.exporters.quantize import quantized_source

    qm = quantize_model(src, 4, 32, "rsq", calib_text=essays(20000), calib_tokens=512, seq_len=128,
                        symmetric=True, scale_dtype=torch.float16)
    path = export_gguf(quantized_source(src, qm), tmp_path / "m.gguf", "q4_0", quantized=qm.quantized())
    back = sources.load_source(str(path)).weights
    for name, qw in qm.quantized().items():
        assert torch.equal(back[name].float(), qw.dequantize()), name
    assert "lm_head.weight" in back  # the rotated head is its own tensor


@pytest.mark.parametrize("kind,fallback", [("q4_k", "iq4_nl"), ("q5_k", "q5_0"), ("q6_k", "q8_0"), ("iq4_nl", "iq4_nl")])
def test_gptq_gguf_on_k_quant_grids_reads_back_exactly(wide_folder, tmp_path, kind, fallback):
    """gptq codes on each linear's type in the plan (the K-quant where rows are whole 256-value
    blocks, its fallback for the 320-wide down projections): the file holds exactly those values,
    and llama.cpp runs it close to the fp32 model."""
    from edgetok.exporters.gguf_types import choose_type
    from edgetok.exporters.quantize import quantized_source
    from edgetok.exporters.verify import compare, model_logits
    from edgetok.runtimes.backends.llamacpp import llamacpp_logits

    src = sources.load_source(str(wide_folder))
    qm = quantize_model(src, method="gptq", calib_text=essays(20000), calib_tokens=512, seq_len=128,
                        gguf_type=lambda name, shape: choose_type(name, shape, kind).type)
    path = export_gguf(quantized_source(src, qm), tmp_path / "m.gguf", kind, quantized=qm.quantized())
    back = sources.load_source(str(path)).weights
    for name, codes in qm.quantized().items():
        expected = fallback if "down_proj" in name else kind
        assert getattr(codes, "kind", None) == expected or (expected not in kquants.TYPES and isinstance(codes, QuantizedWeight))
        assert torch.equal(back[name].float(), codes.dequantize()), name
    assert qm.info["grids"] == ({kind: 6 * src.config.num_layers, fallback: src.config.num_layers} if kind != fallback
                                else {kind: 7 * src.config.num_layers})
    ids = src.tokenizer.encode(essays(2000))[:64]
    ref = model_logits(LlamaModel.from_state_dict(src.config, src.weights), ids)
    assert compare(ref, llamacpp_logits(path, ids), ids).kl_mean < 0.05


def test_cli_export_gptq_on_a_k_quant(wide_folder, tmp_path):
    """--method rsq --quant q4_k: the type plan's types, written from rsq's codes, run by llama.cpp."""
    import json

    import gguf

    out = tmp_path / "k.gguf"
    r = run_cli("export", str(wide_folder), "--format", "gguf", "--quant", "q4_k", "--method", "rsq",
                "--calib-tokens", "1024", "--eval-tokens", "64", "-o", str(out), "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.output[r.output.index("{"):])
    assert m["quantization"]["grids"] == {"iq4_nl": 2, "q4_k": 12}
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.0.ffn_down.weight"] == "IQ4_NL"
    plan = {t["tensor"]: t for t in m["type_plan"]}
    assert plan["blk.0.ffn_down.weight"]["type"] == "iq4_nl" and "320" in plan["blk.0.ffn_down.weight"]["why"]
    assert m["parity"]["kl_mean"] < 0.05


def test_cli_method_errors(tied_folder, tmp_path):
    out = tmp_path / "m.gguf"
    r = run_cli("export", str(tied_folder), "--format", "gguf", "--quant", "q4_1", "--method", "gptq", "-o", str(out))
    assert r.exit_code != 0 and "--method gptq writes its codes on the grid of" in r.output
    r = run_cli("export", str(tied_folder), "--format", "gguf", "--quant", "q4_0", "--calib-tokens", "1024", "-o", str(out))
    assert r.exit_code != 0 and "rtn needs no calibration" in r.output
    assert not out.exists()


def test_cli_export_rsq_gguf_runs_in_llamacpp(tied_folder, tmp_path):
    """The whole path: calibrate, rotate, write q4_0 blocks, run the file in llama.cpp, report."""
    import json

    out = tmp_path / "rsq.gguf"
    r = run_cli("export", str(tied_folder), "--format", "gguf", "--quant", "q4_0", "--method", "rsq",
                                 "--calib-tokens", "1024", "--keep-sensitive", "--eval-tokens", "64", "-o", str(out), "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.output[r.output.index("{"):])
    assert m["method"] == "rsq" and m["quantization"]["calibration_sequences"] == 2
    assert m["quantization"]["untied_head"] is True
    assert m["kept_at_higher_precision"]["lm_head.weight"] == "q8_0"  # the untied head, as llama.cpp keeps it
    assert m["parity"]["top1_agreement"] > 0.5 and m["parity"]["kl_mean"] < 0.5
