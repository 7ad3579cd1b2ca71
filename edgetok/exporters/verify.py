"""Parity reports: how close an artifact's next-token distributions are to the reference model's."""

from __future__ import annotations

import numpy as np
import torch

from edgetok.models.llama import LlamaModel
from edgetok.models.manifest import ParityReport
from edgetok.models.sources import Source
from edgetok.runtimes.kv import ContiguousCache


def model_logits(model: LlamaModel, tokens: list[int], chunk: int = 256) -> torch.Tensor:
    """Logits (T, V) float32 at every position of `tokens`, prefilled in chunks."""
    c = model.config
    cache = ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim, capacity=len(tokens), windows=c.windows)
    with torch.inference_mode():
        return torch.cat([model(torch.tensor([tokens[i : i + chunk]]), cache, last=None)[0] for i in range(0, len(tokens), chunk)])


def reference_logits(source: Source, tokens: list[int]) -> torch.Tensor:
    return model_logits(LlamaModel.from_state_dict(source.config, source.weights), tokens)


def compare(reference: torch.Tensor, test: torch.Tensor, tokens: list[int]) -> ParityReport:
    """reference, test: logits (T, V) for the same `tokens`; the text's own next tokens give perplexity."""
    assert reference.shape == test.shape, (reference.shape, test.shape)
    ref_logp = reference.double().log_softmax(-1)
    test_logp = test.double().log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - test_logp)).sum(-1)  # (T,)
    target = torch.tensor(tokens[1:])
    nll = lambda logp: -logp[:-1].gather(1, target[:, None]).mean().item()  # noqa: E731
    return ParityReport(
        tokens=len(tokens),
        top1_agreement=(reference.argmax(-1) == test.argmax(-1)).double().mean().item(),
        max_abs_dlogit=(reference - test).abs().max().item(),
        perplexity_reference=float(np.exp(nll(ref_logp))),
        perplexity=float(np.exp(nll(test_logp))),
        kl_mean=kl.mean().item(),
        kl_max=kl.max().item(),
    )
