"""The engine on a tiny random model: determinism, stops, sampling, streaming, prefix reuse."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edgetok.errors import EdgetokError
from edgetok.runtimes.engine import GenerationConfig, StopStringFilter
from edgetok.runtimes.sampling import SamplingParams, filter_logits, new_generator, sample, softmax

PROMPT = "The quick brown fox"


def test_greedy_is_deterministic(tiny):
    a = tiny.generate(PROMPT, max_new_tokens=24, ignore_eos=True)
    tiny.engine.reset()
    b = tiny.generate(PROMPT, max_new_tokens=24, ignore_eos=True)
    assert a.tokens == b.tokens and len(a.tokens) == 24
    assert a.finish_reason == "length"
    assert a.text == tiny.tokenizer.decode(a.tokens)


def test_greedy_follows_argmax_of_full_forward(tiny):
    """Each greedy token is the argmax of a fresh full forward over everything before it."""
    from edgetok.runtimes.kv import ContiguousCache

    r = tiny.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
    ids = tiny.tokenizer.encode(PROMPT)
    model, c = tiny.engine.backend.model, tiny.config
    with torch.inference_mode():
        for tok in r.tokens:
            fresh = ContiguousCache(c.num_layers, c.num_kv_heads, c.head_dim)
            assert int(model(torch.tensor([ids]), fresh)[0, -1].argmax()) == tok
            ids.append(tok)


def test_prefix_reuse_gives_the_same_tokens(tiny):
    tiny.engine.reset()
    base = tiny.generate(PROMPT + " jumps over", max_new_tokens=12, ignore_eos=True)
    tiny.engine.reset()
    tiny.generate(PROMPT, max_new_tokens=3, ignore_eos=True)  # leaves the shared prefix in the cache
    again = tiny.generate(PROMPT + " jumps over", max_new_tokens=12, ignore_eos=True)
    assert again.stats.reused_prompt_tokens > 0
    assert again.tokens == base.tokens


def test_chunked_prefill_matches_one_shot(tiny):
    prompt = PROMPT * 6
    tiny.engine.reset()
    one = tiny.generate(prompt, max_new_tokens=10, ignore_eos=True, prefill_chunk=4096)
    tiny.engine.reset()
    chunked = tiny.generate(prompt, max_new_tokens=10, ignore_eos=True, prefill_chunk=7)
    assert chunked.tokens == one.tokens


def test_eos_stops_generation(tiny):
    ref = tiny.generate(PROMPT, max_new_tokens=30, ignore_eos=True)
    k = next(i for i in range(1, 30) if ref.tokens[i] not in ref.tokens[:i])  # its first appearance
    eos = ref.tokens[k]
    saved = tiny.tokenizer.eos_ids
    tiny.tokenizer.eos_ids = [eos]
    try:
        r = tiny.generate(PROMPT, max_new_tokens=30)
    finally:
        tiny.tokenizer.eos_ids = saved
    assert r.finish_reason == "eos"
    assert r.tokens == ref.tokens[:k]


def test_stop_string_cuts_text_and_stream(tiny):
    ref = tiny.generate(PROMPT, max_new_tokens=30, ignore_eos=True)
    stop = ref.text[8:11]
    assert stop and stop not in ref.text[:8]
    stream = tiny.stream(PROMPT, max_new_tokens=30, ignore_eos=True, stop=[stop])
    pieces = list(stream)
    assert stream.result.finish_reason == "stop"
    assert stream.result.text == ref.text[: ref.text.index(stop)]
    assert "".join(pieces) == stream.result.text
    assert len(stream.result.tokens) < 30


def test_stop_filter_holds_back_possible_starts():
    f = StopStringFilter(("END",))
    assert f.feed("abcE") == "abc"  # "E" may start "END"
    assert f.feed("Nx") == "ENx"
    assert f.feed("yyEN") == "yy"
    assert f.feed("D tail") == "" and f.stopped


def test_streaming_joins_to_text(tiny):
    stream = tiny.stream(PROMPT, max_new_tokens=40, temperature=0.9, seed=3, ignore_eos=True)
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces) == stream.result.text == tiny.tokenizer.decode(stream.result.tokens)


def test_seeded_sampling_is_reproducible(tiny):
    a = tiny.generate(PROMPT, max_new_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    b = tiny.generate(PROMPT, max_new_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    c = tiny.generate(PROMPT, max_new_tokens=20, temperature=1.0, seed=8, ignore_eos=True)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_repetition_penalty_changes_greedy_output(tiny):
    plain = tiny.generate(PROMPT, max_new_tokens=30, ignore_eos=True)
    penalized = tiny.generate(PROMPT, max_new_tokens=30, ignore_eos=True, repetition_penalty=1.8)
    assert len(set(penalized.tokens)) >= len(set(plain.tokens))
    assert penalized.tokens != plain.tokens


def test_filters():
    logits = np.array([4.0, 3.0, 2.0, 1.0, 0.0], np.float32)
    kept = lambda p: np.flatnonzero(np.isfinite(filter_logits(logits, p))).tolist()  # noqa: E731
    assert kept(SamplingParams(temperature=1.0, top_k=2)) == [0, 1]
    probs = softmax(logits)  # 0.64, 0.24, 0.09, ...
    assert kept(SamplingParams(temperature=1.0, top_p=0.5)) == [0]
    assert kept(SamplingParams(temperature=1.0, top_p=0.7)) == [0, 1]
    assert kept(SamplingParams(temperature=1.0, min_p=0.3)) == [0, 1]
    assert probs[1] / probs[0] > 0.3 > probs[2] / probs[0]


def test_extreme_sampling_values_stay_defined():
    """A temperature near 0 is greedy, and a huge penalty is a huge one: never a NaN distribution."""
    logits, g = np.array([1.0, 3.0, -2.0, 3.5], np.float32), new_generator(0)
    assert sample(logits, SamplingParams(temperature=1e-300), None, g) == 3
    seen = np.array([False, False, False, True])
    assert sample(logits, SamplingParams(temperature=1.0, repetition_penalty=1e-45), seen, g) == 3
    assert sample(logits, SamplingParams(temperature=1.0, repetition_penalty=1e38), seen, g) != 3


@pytest.mark.parametrize("options, fragment", [
    (dict(temperature=math.inf), "temperature must be a finite number ≥ 0, not inf"),
    (dict(top_p=math.nan), "top_p must be a finite number in (0, 1], not nan"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be a whole number ≥ 0, not 2.5"),
    (dict(seed=-1), "seed must be a whole number in [0, 2**63)"),
    (dict(stop=[1]), "stop must be a string or a list of strings"),
])
def test_generation_config_refuses_in_one_sentence(options, fragment):
    with pytest.raises(EdgetokError) as e:
        GenerationConfig(**options)
    assert fragment in str(e.value)


def test_max_new_tokens_and_context_limit(tiny):
    assert tiny.generate(PROMPT, max_new_tokens=0).tokens == []
    ctx = tiny.config.max_context
    ids = tiny.tokenizer.encode(PROMPT)
    r = tiny.engine
    long_prompt = (ids * ctx)[: ctx - 5]
    result = None
    for item in r.generate_ids(long_prompt, GenerationConfig(max_new_tokens=50, ignore_eos=True)):
        result = item
    assert len(result.tokens) == 5 and result.finish_reason == "length"
    with pytest.raises(EdgetokError, match="context holds"):
        list(r.generate_ids(ids * ctx, GenerationConfig()))


def test_invalid_generation_options():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(min_p=2), dict(repetition_penalty=0)):
        with pytest.raises(EdgetokError):
            GenerationConfig(**bad)


def test_chat_applies_template(tiny):
    ids = tiny.encode([{"role": "user", "content": "hi"}], chat=True)
    text = tiny.tokenizer.decode(ids, skip_special_tokens=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
