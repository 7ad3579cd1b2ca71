"""Rotations of a Llama-family state dict that leave the float model's outputs unchanged.

Rotating the residual stream by an orthogonal Q (x → xQ) spreads the weights' outliers over all
input columns, which makes them easier to quantize (QuaRot, SpinQuant; RSQ's first step). It is
exact because RMSNorm without a weight commutes with Q (‖xQ‖ = ‖x‖), so the norms' weights are
folded into the linears they feed first. All of it is offline: the result is a plain Llama state
dict that every runtime loads.

Row-vector convention (y = x Wᵀ): a linear reading the stream takes W Q; one writing into it
takes Qᵀ W; the embedding and the output head take E Q and W Q.
"""

from __future__ import annotations

import dataclasses

import torch

from edgetok.models.config import ModelConfig
from edgetok.models.names import (
    EMBEDDING,
    FINAL_NORM,
    LM_HEAD,
    NORM_INPUTS,
    O_PROJ,
    READS_STREAM,
    V_PROJ,
    WRITES_STREAM,
    layer,
)


# -- orthogonal matrices --------------------------------------------------------------------------
def _is_prime(n: int) -> bool:
    return n > 1 and all(n % p for p in range(2, int(n**0.5) + 1))


def _paley(n: int) -> torch.Tensor:
    """Paley's construction I: a Hadamard matrix of order n = q + 1, q prime ≡ 3 (mod 4)."""
    q = n - 1
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in residues else -1 for i in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx[None, :] - idx[:, None]) % q]  # antisymmetric for q ≡ 3 (mod 4)
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal
    return s + torch.eye(n, dtype=torch.float64)


def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix (n, n) of ±1 with H Hᵀ = n I, from Sylvester doublings of a Paley
    matrix (576 = 8 · 72), or None when neither construction reaches n."""
    if n == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if n % 2 == 0:
        half = hadamard(n // 2)
        if half is not None:
            return torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), half)
    if n % 4 == 0 and _is_prime(n - 1) and (n - 1) % 4 == 3:
        return _paley(n)
    return None


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A random Hadamard rotation H·diag(±1)/√n (n, n) float64, or a Haar-random orthogonal
    matrix where no Hadamard matrix of order n is constructed."""
    gen = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
        return h * signs[None, :] / n**0.5
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


# -- folding and rotating a state dict ------------------------------------------------------------
def fold_norms(weights: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Multiply each RMSNorm's weight into the columns of the linears it feeds and set it to 1.

    A tied output head becomes its own tensor (embedding · final norm weight) unless the final
    norm's weight is already all ones: after a rotation an embedding and a head can only stay
    tied if nothing but the rotation separates them. Returns float64 tensors and the config.
    """
    w = {k: v.double() for k, v in weights.items()}
    for i in range(cfg.num_layers):
        for norm, linears in NORM_INPUTS.items():
            g = w[layer(i, f"{norm}.weight")]
            for lin in linears:
                w[layer(i, f"{lin}.weight")] = w[layer(i, f"{lin}.weight")] * g[None, :]
            w[layer(i, f"{norm}.weight")] = torch.ones_like(g)
    g = w[f"{FINAL_NORM}.weight"]
    if cfg.tie_word_embeddings and bool((g == 1).all()):
        w.pop(LM_HEAD, None)
        return w, cfg
    head = w[EMBEDDING] if cfg.tie_word_embeddings else w[LM_HEAD]
    w[LM_HEAD] = head * g[None, :]
    w[f"{FINAL_NORM}.weight"] = torch.ones_like(g)
    return w, dataclasses.replace(cfg, tie_word_embeddings=False)


def rotate(
    weights: dict[str, torch.Tensor], cfg: ModelConfig, seed: int = 0, heads: bool = True
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Fold the norms, rotate the residual stream by a random Hadamard Q (hidden, hidden) and,
    with `heads`, each value head by one R (head_dim, head_dim) (v_proj's rows, o_proj's columns:
    attention mixes tokens, not channels, so R passes through it). Float32 tensors out; the config
    says whether the head is still tied to the embedding."""
    w, cfg = fold_norms(weights, cfg)
    q = random_orthogonal(cfg.hidden_size, seed)
    w[EMBEDDING] = w[EMBEDDING] @ q
    if LM_HEAD in w:
        w[LM_HEAD] = w[LM_HEAD] @ q
    r = random_orthogonal(cfg.head_dim, seed + 1) if heads else None
    d = cfg.head_dim
    for i in range(cfg.num_layers):
        for lin in READS_STREAM:
            w[layer(i, f"{lin}.weight")] = w[layer(i, f"{lin}.weight")] @ q
        for lin in WRITES_STREAM:
            w[layer(i, f"{lin}.weight")] = q.T @ w[layer(i, f"{lin}.weight")]
            if layer(i, f"{lin}.bias") in w:
                w[layer(i, f"{lin}.bias")] = w[layer(i, f"{lin}.bias")] @ q
        if r is not None:
            v_w, v_b, o_w = layer(i, f"{V_PROJ}.weight"), layer(i, f"{V_PROJ}.bias"), layer(i, f"{O_PROJ}.weight")
            v = w[v_w]  # (Hkv·D, hidden): per head R ᵀ W_h
            w[v_w] = (r.T @ v.view(-1, d, v.shape[1])).reshape(v.shape)
            if v_b in w:
                w[v_b] = (w[v_b].view(-1, d) @ r).reshape(w[v_b].shape)
            o = w[o_w]  # (hidden, Hq·D): per head W_h R
            w[o_w] = (o.view(o.shape[0], -1, d) @ r).reshape(o.shape)
    return {k: v.float() for k, v in w.items()}, cfg
