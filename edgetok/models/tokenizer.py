"""Tokenizers (HF tokenizer.json or built from GGUF metadata), chat templates, streaming decode."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from edgetok.errors import EdgetokError

# llama.cpp's pre-tokenizer names → the splitting regex of the original tokenizer.json.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` plus what generation needs to know about special tokens."""

    tok: HFTokenizer
    bos_id: int | None = None
    eos_ids: list[int] = field(default_factory=list)
    chat_template: str | None = None
    kind: str = "bpe"  # for inspect: "bpe (gpt2, smollm)", "spm", ...

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_text(self, token_id: int) -> str | None:
        return self.tok.id_to_token(token_id)

    @property
    def bos_token(self) -> str:
        return (self.bos_id is not None and self.tok.id_to_token(self.bos_id)) or ""

    @property
    def eos_token(self) -> str:
        return (self.eos_ids and self.tok.id_to_token(self.eos_ids[0])) or ""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; add_special_tokens adds the BOS the model expects, if any."""
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise EdgetokError("this model has no chat template; run it with --no-chat")
        try:
            template = _jinja_env().from_string(self.chat_template)
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                tools=None,
            )
        except jinja2.TemplateError as e:
            raise EdgetokError(f"the model's chat template failed: {e}") from None

    # -- persistence: the converted-model cache stores tokenizers in this form --------------------
    def save(self, folder: Path) -> None:
        self.tok.save(str(folder / "tokenizer.json"))
        meta = {"bos_id": self.bos_id, "eos_ids": self.eos_ids, "chat_template": self.chat_template, "kind": self.kind}
        (folder / "tokenizer_meta.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, folder: Path) -> Tokenizer:
        meta = json.loads((folder / "tokenizer_meta.json").read_text())
        return cls(HFTokenizer.from_file(str(folder / "tokenizer.json")), **meta)


class StreamDecoder:
    """Turns token ids, one at a time, into text pieces that join to `decode(all ids)`.

    A piece is released only once it no longer ends in an incomplete UTF-8 sequence (byte-level
    BPE splits multi-byte characters across tokens); decoding a sliding window of ids keeps the
    cost per token constant and lets tokenizers that strip a leading space see the context.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded each time
        self.read = 0  # ids before this are already emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(done) :]
        return ""


def _raise(message: str):
    raise jinja2.TemplateError(message)


def _jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


# -- Hugging Face folders -------------------------------------------------------------------------
def _token_content(tok: Any) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


def tokenizer_from_hf_folder(folder: Path, eos_ids: list[int], bos_id: int | None) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise EdgetokError(f"{folder} has no tokenizer.json (edgetok needs the fast-tokenizer file)")
    tok = HFTokenizer.from_file(str(path))
    cfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    jinja_file = folder / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text()
    eos = list(eos_ids)
    eos_text = _token_content(tcfg.get("eos_token"))
    if eos_text is not None and tok.token_to_id(eos_text) is not None and tok.token_to_id(eos_text) not in eos:
        eos.append(tok.token_to_id(eos_text))
    bos_text = _token_content(tcfg.get("bos_token"))
    if bos_id is None and bos_text is not None:
        bos_id = tok.token_to_id(bos_text)
    return Tokenizer(tok, bos_id=bos_id, eos_ids=eos, chat_template=template, kind=tok.model.__class__.__name__.lower())


# -- GGUF metadata --------------------------------------------------------------------------------
def tokenizer_from_gguf(meta: dict[str, Any]) -> Tokenizer:
    """Build the tokenizer llama.cpp would use from a GGUF's `tokenizer.ggml.*` fields."""
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        pre = meta.get("tokenizer.ggml.pre", "default")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in ("llama-bpe", "llama3", "qwen2", "deepseek-r1-qwen"):
            split = QWEN2_SPLIT if pre.startswith(("qwen2", "deepseek")) else LLAMA3_SPLIT
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
            )
        elif pre == "smollm":
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        label = f"bpe (gpt2, {pre})"
    elif kind == "llama":
        scores: list[float] = meta["tokenizer.ggml.scores"]
        unk = meta.get("tokenizer.ggml.unknown_token_id", 0)
        tok = HFTokenizer(
            models.BPE(vocab=vocab, merges=_spm_merges(vocab, scores), unk_token=tokens[unk], fuse_unk=True, byte_fallback=True)
        )
        prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        steps = [normalizers.Prepend("▁")] if prefix else []
        tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
        dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        label = "spm (llama)"
    else:
        raise EdgetokError(f"unsupported tokenizer type '{kind}' in the GGUF (edgetok reads gpt2 and llama)")

    specials = [
        AddedToken(t, special=types[i] == TOKEN_CONTROL, normalized=False)
        for i, t in enumerate(tokens)
        if types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    ]
    tok.add_tokens(specials)
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)]
        )
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    return Tokenizer(
        tok,
        bos_id=bos,
        eos_ids=list(dict.fromkeys(eos)),
        chat_template=meta.get("tokenizer.chat_template"),
        kind=label,
    )


def _spm_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges, recovered from the vocab: a piece is a merge of two pieces, ranked
    by the merged piece's score (llama.cpp merges the best-scoring pair first)."""
    ranked = []
    for piece, pid in vocab.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                ranked.append((-scores[pid], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def gguf_tokenizer_fields(tokenizer: Tokenizer) -> dict[str, Any]:
    """The `tokenizer.ggml.*` fields that rebuild this tokenizer (the inverse of tokenizer_from_gguf)."""
    spec = json.loads(tokenizer.tok.to_str())
    model = spec["model"]
    if model["type"] != "BPE":
        raise EdgetokError(f"cannot write a {model['type']} tokenizer into GGUF (edgetok writes BPE tokenizers)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, t in added.items():
        vocab.setdefault(content, t["id"])
    tokens = [""] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    types = [
        (TOKEN_CONTROL if added[t]["special"] else TOKEN_USER_DEFINED) if t in added else TOKEN_NORMAL
        for t in tokens
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    byte_fallback = model.get("byte_fallback", False)
    fields: dict[str, Any] = {
        "tokenizer.ggml.model": "llama" if byte_fallback else "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
    }
    if byte_fallback:  # SentencePiece-style: merges are recovered from scores, highest merge rank first
        rank = {m: i for i, m in enumerate(merges)}
        fields["tokenizer.ggml.scores"] = [
            -float(rank.get(_best_split(t, vocab, rank), len(rank))) if len(t) > 1 else 0.0 for t in tokens
        ]
        for i, t in enumerate(tokens):
            if re_byte_token(t):
                types[i] = TOKEN_BYTE
        fields["tokenizer.ggml.add_space_prefix"] = "Prepend" in json.dumps(spec.get("normalizer"))
        if model.get("unk_token") in vocab:
            fields["tokenizer.ggml.unknown_token_id"] = vocab[model["unk_token"]]
    else:
        fields["tokenizer.ggml.merges"] = merges
        fields["tokenizer.ggml.pre"] = _pre_tokenizer_name(spec.get("pre_tokenizer"))
    if tokenizer.bos_id is not None:
        fields["tokenizer.ggml.bos_token_id"] = tokenizer.bos_id
    fields["tokenizer.ggml.add_bos_token"] = bool(
        tokenizer.bos_id is not None and tokenizer.encode("a") and tokenizer.encode("a")[0] == tokenizer.bos_id
    )
    if tokenizer.eos_ids:
        fields["tokenizer.ggml.eos_token_id"] = tokenizer.eos_ids[0]
    if len(tokenizer.eos_ids) > 1:
        fields["tokenizer.ggml.eot_token_id"] = tokenizer.eos_ids[1]
    if tokenizer.chat_template:
        fields["tokenizer.chat_template"] = tokenizer.chat_template
    return fields


def re_byte_token(t: str) -> bool:
    return len(t) == 6 and t.startswith("<0x") and t.endswith(">")


def _best_split(token: str, vocab: dict[str, int], rank: dict[str, int]) -> str:
    splits = [f"{token[:i]} {token[i:]}" for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
    return min(splits, key=lambda m: rank.get(m, len(rank)), default="")


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for the pre-tokenizer (it picks the splitting regex by this name)."""
    text = json.dumps(pre or {})
    if '"Digits"' in text and '"individual_digits": true' in text:
        return "smollm"
    if "\\\\p{N}{1,3}" in text:
        return "llama-bpe"
    if "\\\\p{N}|" in text or "\\\\p{N}| ?" in text:
        return "qwen2"
    return "default"
