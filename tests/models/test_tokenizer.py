"""Tokenizers rebuilt from GGUF metadata agree with transformers'; chat templates; streaming decode."""

from __future__ import annotations

import pytest
from conftest import TRICKY, essay_text, smollm2_path

from edgetok.models.tokenizer import StreamDecoder


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    path = smollm2_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers' GGUF converter ignores `tokenizer.ggml.pre`; llama.cpp's "smollm" splits digits
    # first, as SmolLM2's original tokenizer.json does. Put that step back in the reference.
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return tok


def test_smollm2_tokenizer_matches_transformers(smollm2, hf_tokenizer):
    tok = smollm2.tokenizer
    for text in TRICKY + [essay_text(20000)]:
        assert tok.encode(text) == hf_tokenizer.encode(text, add_special_tokens=True), text[:40]


def test_smollm2_chat_template_matches_transformers(smollm2, hf_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    want = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert smollm2.tokenizer.apply_chat_template(messages) == want
    assert smollm2.tokenizer.apply_chat_template(messages[1:2]).startswith("<|im_start|>system\nYou are a helpful")


def test_stream_decoder_joins_to_full_decode(smollm2):
    tok = smollm2.tokenizer
    for text in TRICKY:
        ids = tok.encode(text, add_special_tokens=False)
        dec = StreamDecoder(tok)
        pieces = [dec.push(i) for i in ids]
        assert "".join(pieces) == tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces)


def test_multibyte_characters_are_never_split(smollm2):
    tok = smollm2.tokenizer
    text = "🙂👍🏽北京"
    ids = tok.encode(text, add_special_tokens=False)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "" in pieces  # some tokens end inside a character: their bytes are held back
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
