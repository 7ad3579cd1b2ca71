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


def compare(reference: torch.Tensor, test: torch.Tensor, tokens: list[int], rows: int = 64) -> ParityReport:
    """reference, test: logits (T, V) for the same `tokens`; the text's own next tokens give perplexity.
    Computed `rows` positions at a time, in float64: a whole 1024-token text's log-softmax over
    Gemma's 262K-entry vocabulary would take 2 GB per copy (and the export's peak with it)."""
    assert reference.shape == test.shape, (reference.shape, test.shape)
    t = reference.shape[0]
    kl_sum = kl_max = dlogit = nll_ref = nll_test = 0.0
    agree = 0
    for a in range(0, t, rows):
        ref, got = reference[a : a + rows], test[a : a + rows]
        ref_logp, test_logp = ref.double().log_softmax(-1), got.double().log_softmax(-1)
        kl = (ref_logp.exp() * (ref_logp - test_logp)).sum(-1)
        kl_sum, kl_max = kl_sum + kl.sum().item(), max(kl_max, kl.max().item())
        agree += (ref.argmax(-1) == got.argmax(-1)).sum().item()
        dlogit = max(dlogit, (ref - got).abs().max().item())
        n = min(a + rows, t - 1) - a  # positions whose next token the text has
        if n > 0:
            target = torch.tensor(tokens[a + 1 : a + 1 + n])[:, None]
            nll_ref -= ref_logp[:n].gather(1, target).sum().item()
            nll_test -= test_logp[:n].gather(1, target).sum().item()
    return ParityReport(
        tokens=len(tokens),
        top1_agreement=agree / t,
        max_abs_dlogit=dlogit,
        perplexity_reference=float(np.exp(nll_ref / (t - 1))),
        perplexity=float(np.exp(nll_test / (t - 1))),
        kl_mean=kl_sum / t,
        kl_max=kl_max,
    )
