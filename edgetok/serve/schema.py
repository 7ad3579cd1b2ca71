"""OpenAI's request bodies → a checked request (a GenerationConfig and the prompt), and OpenAI's
error object for everything wrong with one.

Each field is checked by one row of FIELDS (its type and range in words); fields edgetok does not
know are ignored, as OpenAI's own server ignores them (extensions, as llama.cpp's server has them:
top_k, min_p, repetition_penalty, ignore_eos), except those whose meaning it cannot honour
(n > 1, logprobs, tools, nonzero presence / frequency penalties), which are refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from edgetok.errors import EdgetokError
from edgetok.runtimes.engine import GenerationConfig

ROLES = ("system", "developer", "user", "assistant")
MAX_STOPS = 4  # OpenAI's limit


@dataclass
class ApiError(Exception):
    """An error response: OpenAI's {"error": {message, type, param, code}} with its status."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# name → (accepts the value?, the rule in words, GenerationConfig field or None); null means "default"
FIELDS: dict[str, tuple] = {
    "max_tokens": (lambda v: _integer(v) and v >= 1, "a whole number ≥ 1", "max_new_tokens"),
    "max_completion_tokens": (lambda v: _integer(v) and v >= 1, "a whole number ≥ 1", "max_new_tokens"),
    "temperature": (lambda v: _number(v) and 0 <= v <= 2, "a number from 0 to 2", "temperature"),
    "top_p": (lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]", "top_p"),
    "top_k": (lambda v: _integer(v) and v >= 0, "a whole number ≥ 0 (0: off)", "top_k"),
    "min_p": (lambda v: _number(v) and 0 <= v <= 1, "a number from 0 to 1", "min_p"),
    "repetition_penalty": (lambda v: _number(v) and v > 0, "a number > 0", "repetition_penalty"),
    "ignore_eos": (lambda v: isinstance(v, bool), "true or false", "ignore_eos"),
    "seed": (lambda v: _integer(v) and 0 <= v < 2**63, "a whole number from 0 to 2**63 - 1", "seed"),
    "stop": (lambda v: isinstance(v, str) or (isinstance(v, list) and len(v) <= MAX_STOPS
                                              and all(isinstance(s, str) for s in v)),
             f"a string or a list of at most {MAX_STOPS} strings", "stop"),
    "stream": (lambda v: isinstance(v, bool), "true or false", None),
    "stream_options": (lambda v: isinstance(v, dict) and isinstance(v.get("include_usage", False), bool),
                       'an object such as {"include_usage": true}', None),
    "n": (lambda v: v == 1 and _integer(v), "1 (this server makes one choice per request)", None),
    "logprobs": (lambda v: v is False, "false (this server does not return log probabilities)", None),
    "presence_penalty": (lambda v: _number(v) and v == 0, "0 (unsupported; use repetition_penalty)", None),
    "frequency_penalty": (lambda v: _number(v) and v == 0, "0 (unsupported; use repetition_penalty)", None),
    "tools": (lambda v: v == [], "absent (this server does not call tools)", None),
    "model": (lambda v: isinstance(v, str), "a string: the model's id (GET /v1/models)", None),
}


@dataclass
class CompletionRequest:
    chat: bool
    prompt: str | list[dict[str, str]] | list[int]  # text, messages, or token ids (completions)
    config: GenerationConfig
    model: str
    stream: bool = False
    include_usage: bool = False


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise invalid(f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def _messages(value) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty list of {\"role\": …, \"content\": …} objects", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"{where} must be an object with 'role' and 'content'", where)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise invalid(f"{where}.role must be one of {', '.join(ROLES)}, not {role!r}", f"{where}.role")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise invalid(f"{where}.content parts must be {{\"type\": \"text\", \"text\": …}} (this model reads text only)",
                              f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise invalid(f"{where}.content must be a string or a list of text parts", f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _prompt(value) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]  # one prompt in a list
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(_integer(t) and t >= 0 for t in value):
        return value  # token ids
    raise invalid("'prompt' must be a string (or one string in a list, or a list of token ids); "
                  "this server runs one prompt per request", "prompt")


def parse_request(body: dict[str, Any], chat: bool, defaults: GenerationConfig) -> CompletionRequest:
    """A request body (already a JSON object) → a checked request; ApiError says what is wrong."""
    for name, value in body.items():
        if name in FIELDS and value is not None and not FIELDS[name][0](value):
            raise invalid(f"'{name}' must be {FIELDS[name][1]}, not {json.dumps(value)[:80]}", name)
    if not isinstance(body.get("model"), str):
        raise invalid("'model' is required: the model's id (GET /v1/models)", "model")
    key = "messages" if chat else "prompt"
    if key not in body:
        raise invalid(f"'{key}' is required", key)
    prompt = _messages(body[key]) if chat else _prompt(body[key])
    stream = bool(body.get("stream"))
    if body.get("stream_options") is not None and not stream:
        raise invalid("'stream_options' applies only with \"stream\": true", "stream_options")
    options = {}
    for name in ("max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
                 "repetition_penalty", "seed", "stop", "ignore_eos"):
        if body.get(name) is not None:
            options[FIELDS[name][2]] = body[name]
    try:
        config = dataclasses.replace(defaults, **options)  # GenerationConfig checks itself again
    except EdgetokError as e:
        raise invalid(str(e)) from None
    include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
    return CompletionRequest(chat, prompt, config, body["model"], stream, include_usage)


def finish_reason(engine_reason: str) -> str:
    """The engine's reason → OpenAI's: an end-of-sequence token or a stop string is "stop"."""
    return "length" if engine_reason == "length" else "stop"
