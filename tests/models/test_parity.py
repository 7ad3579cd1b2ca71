"""edgetok's reference model against transformers: same logits (fp32) in prefill and decode."""

from __future__ import annotations

import pytest
import torch
from conftest import HF_CONFIGS, essay_text, make_hf_model

from edgetok.models.checkpoint import split_fused
from edgetok.models.config import ModelConfig
from edgetok.models.llama import LlamaModel
from edgetok.runtimes.kv import ContiguousCache

TOL = 1e-4


def edgetok_logits(model: LlamaModel, ids: list[int], prompt_len: int, chunk: int) -> torch.Tensor:
    """Logits (T, V) at every position: chunked prefill of the prompt, then one token per step."""
    c = model.config
    cache = ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim, capacity=4)  # forces growth
    out = []
    with torch.inference_mode():
        for start in range(0, prompt_len, chunk):
            out.append(model(torch.tensor([ids[start : min(start + chunk, prompt_len)]]), cache, last=None)[0])
        for tok in ids[prompt_len:]:
            out.append(model(torch.tensor([[tok]]), cache, last=None)[0])
    return torch.cat(out)


def greedy_continuation(model: LlamaModel, prompt: list[int], steps: int) -> list[int]:
    c = model.config
    cache = ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim)
    ids = list(prompt)
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), cache)
        for _ in range(steps):
            ids.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([ids[-1:]]), cache)
    return ids


@pytest.mark.parametrize("kind", sorted(HF_CONFIGS))
def test_random_model_parity(kind):
    hf = make_hf_model(kind, vocab_size=300, seed=1)
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    ours = LlamaModel.from_state_dict(cfg, split_fused(hf.state_dict(), cfg))  # Phi-3 stacks q/k/v, gate/up
    torch.manual_seed(2)
    prompt = torch.randint(0, 300, (40,)).tolist()
    ids = greedy_continuation(ours, prompt, 32)  # 40 prompt + 32 decoded = 72 > 32: llama3 scaling matters
    got = edgetok_logits(ours, ids, len(prompt), chunk=16)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    assert want.abs().max() > 1.0  # the comparison is not between near-zero logits
    assert (got - want).abs().max().item() <= TOL


def test_tied_embeddings_share_storage():
    hf = make_hf_model("smollm", vocab_size=300)
    ours = LlamaModel.from_state_dict(ModelConfig.from_hf(hf.config.to_dict()), hf.state_dict())
    assert ours.lm_head.weight is ours.model.embed_tokens.weight


@pytest.mark.slow
def test_smollm2_parity_with_transformers(smollm2, hf_smollm2):
    tok = smollm2.tokenizer
    prompt = tok.encode(essay_text(3000)[:1500])
    model = smollm2.engine.backend.model
    ids = greedy_continuation(model, prompt, 32)
    got = edgetok_logits(model, ids, len(prompt), chunk=128)
    with torch.no_grad():
        want = hf_smollm2(torch.tensor([ids])).logits[0]
    diff = (got - want).abs()
    assert diff[: len(prompt)].max().item() <= TOL, "prefill"
    assert diff[len(prompt) :].max().item() <= TOL, "decode"
