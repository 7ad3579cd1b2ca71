"""Layer-wise calibration: run real text through the reference model one decoder layer at a
time, and quantize each layer's linears from the inputs they actually see.

Per layer, in GPTQ's order, each step's inputs come from the already-quantized steps before it:
q/k/v (from the layer input), o (from attention over the quantized q/k/v), gate/up (from the
residual after the quantized o), down (from the quantized gate/up). Memory is bounded by one
layer's calibration activations (its input, attention output and MLP intermediate for all
sequences, float32) plus one batch of attention probabilities: ≈ 0.4 GB for a 135M model with
32K tokens, whatever the number of layers.

RSQ (Sung et al. 2025, "Learning from important tokens") weights each token's outer product
in the Hessians by its importance: the attention it receives in that layer (AttnCon), summed
over heads and queries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import groupby
from typing import Any

import torch

from edgetok.errors import EdgetokError
from edgetok.kernels.attention import attend, causal_mask
from edgetok.models.llama import LlamaModel
from edgetok.models.names import DOWN_PROJ, GATE_UP, O_PROJ, QKV, layer
from edgetok.models.tokenizer import Tokenizer
from edgetok.texts import essays

SEQ_LEN = 512
DEFAULT_TOKENS = 32768  # 64 sequences of 512

# (the HF name of the first linear, weight (N, K) of the linears in one step that share a grid,
# stacked by rows; Hessian (K, K)) → codes (QuantizedWeight or kquants.Blocks: `rows`, `dequantize`),
# or None to leave them float
QuantizeFn = Callable[[str, torch.Tensor, torch.Tensor], Any]


def calibration_tokens(tokenizer: Tokenizer, text: str | None, n_tokens: int, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """(S, seq_len) token ids. The default text is the *end* of the built-in essays; evaluation
    (export's parity report, benchmarks) reads their beginning, so the two never share text."""
    if n_tokens < seq_len:
        raise EdgetokError(f"calibration needs at least one sequence of {seq_len} tokens, not {n_tokens}")
    if text is None:
        ids = tokenizer.encode(essays(10**9))[-n_tokens:]
    else:
        ids = tokenizer.encode(text)[:n_tokens]
    n_seq = len(ids) // seq_len
    if n_seq < 1:
        raise EdgetokError(f"the calibration text has {len(ids)} tokens; it needs at least {seq_len}")
    return torch.tensor(ids[: n_seq * seq_len]).view(n_seq, seq_len)


def attention_importance(probs: torch.Tensor, r_max: float = 10.0) -> torch.Tensor:
    """probs (B, H, T, T) causal attention → token weights (B, T) with mean 1 per sequence.

    AttnCon: the attention each token receives, summed over heads and queries, divided by the
    square root of how many queries can see it (early tokens are seen by more queries; RSQ's
    "sqrt" normalization), then mapped linearly to [1, r_max] per sequence.
    """
    t = probs.shape[-1]
    received = probs.sum(dim=(1, 2))  # (B, T)
    seen_by = torch.arange(t, 0, -1, dtype=received.dtype)  # token j is seen by T - j queries
    r = received / seen_by.sqrt()
    lo, hi = r.amin(-1, keepdim=True), r.amax(-1, keepdim=True)
    r = 1 + (r_max - 1) * (r - lo) / (hi - lo).clamp_min(1e-12)
    return r / r.mean(-1, keepdim=True)


class _Attention:
    """A stand-in for the KV cache: full causal attention over the tokens of this call, keeping
    what calibration needs (the attention output, o_proj's input; optionally the probabilities'
    importance) so the model's own Attention module computes q/k/v and RoPE."""

    def __init__(self, want_importance: bool, r_max: float, windows: list[int | None]) -> None:
        self.want_importance, self.r_max, self.windows = want_importance, r_max, windows
        self.out: torch.Tensor | None = None  # (B, Hq, T, D)
        self.importance: torch.Tensor | None = None  # (B, T)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t = q.shape[2]
        mask = causal_mask(t, t, self.windows[layer], device=q.device)
        if mask is None:  # (one token)
            mask = torch.ones(1, 1, dtype=torch.bool)
        if self.want_importance:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # (B, Hq, T, T)
            self.importance = attention_importance(probs, self.r_max)
            self.out = probs @ v
        else:
            self.out = attend(q, k, v, mask)
        return self.out


class _Hessian:
    """H = 2/n Σ_t w_t x_t x_tᵀ over the calibration tokens, accumulated in float64."""

    def __init__(self, k: int) -> None:
        self.h = torch.zeros(k, k, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor, weight: torch.Tensor | None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, K)
        self.n += x.shape[0]
        xw = x if weight is None else x * weight.reshape(-1, 1).sqrt()
        self.h += (xw.T @ xw).double()

    def value(self) -> torch.Tensor:
        return self.h * (2 / self.n)


@torch.no_grad()
def calibrate(
    model: LlamaModel,
    tokens: torch.Tensor,
    quantize: QuantizeFn,
    *,
    weighted: bool = False,
    r_max: float = 10.0,
    batch: int = 8,
    progress=None,
    grid_of: Callable[[str], Any] = lambda name: None,
) -> dict[str, Any]:
    """Quantize every decoder linear of `model` (float32) on tokens (S, T), layer by layer.

    The model's linears are replaced by their dequantized weights as they are quantized (so
    later steps see the quantized outputs); returns HF name → codes (quantize returning None: a
    linear left float, not in the result). The linears of one step (one input) are quantized
    together, stacked, where grid_of(HF name) says they share a grid.
    """
    s, t = tokens.shape
    rope = model.rope(torch.arange(t), torch.float32)  # per layer kind, with the family's cos / sin scale
    batches = [slice(i, min(i + batch, s)) for i in range(0, s, batch)]
    x = torch.cat([model.embed(tokens[b]).float() for b in batches])  # (S, T, hidden)
    layers = list(enumerate(model.model.layers))
    result: dict[str, Any] = {}

    def quantize_step(i: int, block, names: tuple[str, ...], hessian: _Hessian) -> None:
        """The linears `names` of layer i (one input, so one Hessian), stacked by rows in runs
        that share a grid (GPTQ rounds each row on its own: stacking only saves loop turns)."""
        h = hessian.value()
        full = {n: layer(i, f"{n}.weight") for n in names}
        for _, run in groupby(names, key=lambda n: grid_of(full[n])):
            run = list(run)
            linears = [block.get_submodule(n) for n in run]
            qw = quantize(full[run[0]], torch.cat([lin.weight for lin in linears]), h)
            if qw is None:  # not quantized here: these linears stay float
                continue
            start = 0
            for name, lin in zip(run, linears):
                n = lin.weight.shape[0]
                part = qw.rows(slice(start, start + n))
                start += n
                result[full[name]] = part
                lin.weight.data = part.dequantize()

    for i, block in progress(layers, len(layers)) if progress else layers:
        attn, mlp = block.self_attn, block.mlp
        cos, sin = rope.of(i)
        importance = torch.ones(s, t)
        # q/k/v: inputs are the layer's normalized inputs; importance from this layer's float attention.
        h_qkv = _Hessian(x.shape[-1])
        for b in batches:
            h = block.input_layernorm(x[b])
            rec = _Attention(weighted, r_max, model.config.windows)
            if weighted:
                attn(h, cos, sin, i, rec)
                importance[b] = rec.importance
            h_qkv.add(h, importance[b] if weighted else None)
        quantize_step(i, block, QKV, h_qkv)
        # o: attention outputs over the quantized q/k/v.
        h_o = _Hessian(attn.o_proj.weight.shape[1])
        pre_o = []
        for b in batches:
            rec = _Attention(False, r_max, model.config.windows)
            attn(block.input_layernorm(x[b]), cos, sin, i, rec)
            a = rec.out.transpose(1, 2).reshape(x[b].shape[0], t, -1)  # (B, T, Hq·D)
            pre_o.append(a)
            h_o.add(a, importance[b] if weighted else None)
        quantize_step(i, block, (O_PROJ,), h_o)
        # gate/up: the residual after the quantized o, normalized.
        h_gu = _Hessian(x.shape[-1])
        for b, a in zip(batches, pre_o):
            x[b] += block.attention_out(attn.o_proj(a))
            h_gu.add(block.mlp_norm(x[b]), importance[b] if weighted else None)
        del pre_o
        quantize_step(i, block, GATE_UP, h_gu)
        # down: the quantized gate/up's product (kept: recomputing it costs a third of the layer).
        h_down = _Hessian(mlp.down_proj.weight.shape[1])
        acts = []
        for b in batches:
            acts.append(mlp.hidden(block.mlp_norm(x[b])))  # (B, T, intermediate)
            h_down.add(acts[-1], importance[b] if weighted else None)
        quantize_step(i, block, (DOWN_PROJ,), h_down)
        for b, act in zip(batches, acts):  # the next layer's inputs, through the fully quantized layer
            x[b] += block.mlp_out(mlp.down_proj(act))
        del acts
    return result
