"""`edgetok serve` on a tiny random model's ONNX export, through the official openai client and raw
HTTP: OpenAI's shapes, temperature-0 equality with `edgetok run --json`, every malformed request
answered with OpenAI's error object, concurrent requests batched yet each equal to its run alone,
a disconnected stream stopping, a full queue refusing, prompt reuse."""

from __future__ import annotations

import http.client
import json
import threading
import time

import openai
import pytest
from conftest import in_threads, make_hf_model, make_tokenizer_files, run_cli
from serving import Server, request

KEY = "sk-test-0123456789"
ALIAS = "tiny"


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """A tiny random Llama with a 4K context (so a stream can run long) and its ONNX export."""
    from tokenizers import Tokenizer

    folder = tmp_path_factory.mktemp("serve-tiny")
    make_tokenizer_files(folder)
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    model = make_hf_model("llama", vocab, seed=5, max_positions=4096)
    model.config.eos_token_id = 2
    model.save_pretrained(folder)
    out = folder / "onnx"
    r = run_cli("export", folder, "--format", "onnx", "--weights", "fp32", "-o", out, "--no-verify")
    assert r.exit_code == 0, r.output
    return {"hf": folder, "onnx": out}


@pytest.fixture(scope="module")
def server(tiny_onnx, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "key").write_text(KEY + "\n")
    s = Server(tiny_onnx["onnx"], "--api-key-file", tmp / "key", "--alias", ALIAS, "--metrics", "--max-sequences", 4,
               "--max-queue", 64, log=tmp / "server.log")
    yield s
    assert s.stop() in (0, 143)  # SIGTERM ends it as Ctrl-C does


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [ALIAS]
    assert request(server.port, "GET", "/health")[0] == 200  # no key needed


def test_chat_and_completions_through_the_openai_client(client):
    messages = [{"role": "user", "content": "The quick brown fox"}]
    whole = client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=12, temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == 12 and choice.message.role == "assistant"
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12

    chunks = list(client.chat.completions.create(model=ALIAS, messages=messages, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12  # the usage chunk comes last

    text = client.completions.create(model=ALIAS, prompt="def add(a, b):", max_tokens=10, temperature=0)
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 10
    streamed = list(client.completions.create(model=ALIAS, prompt="def add(a, b):", max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"

    # stop: the text ends before the stop string, finish_reason "stop"
    long = client.completions.create(model=ALIAS, prompt="def add(a, b):", max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = long[5:8]
    cut = client.completions.create(model=ALIAS, prompt="def add(a, b):", max_tokens=40, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and cut.text == long[: long.index(stop)]


def test_sampling_is_per_request_and_reproducible_by_seed(client):
    def ask(seed):
        return client.completions.create(model=ALIAS, prompt="Hello", max_tokens=16, temperature=1.0, seed=seed,
                                         extra_body={"top_k": 50, "ignore_eos": True}).choices[0].text

    assert ask(1) == ask(1) and ask(1) != ask(2)


@pytest.mark.parametrize("chat", [True, False])
def test_temperature_zero_equals_edgetok_run_json(tiny_onnx, client, chat):
    prompt = "Émile paid 12,345 € for a café"
    r = run_cli("run", tiny_onnx["onnx"], "-p", prompt, "--json", "-n", 24, "--chat" if chat else "--no-chat")
    assert r.exit_code == 0, r.output
    want = json.loads(r.stdout)
    if chat:
        got = client.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": prompt}], max_tokens=24,
                                             temperature=0)
        text = got.choices[0].message.content
    else:
        got = client.completions.create(model=ALIAS, prompt=prompt, max_tokens=24, temperature=0)
        text = got.choices[0].text
    assert text == want["text"]
    assert got.usage.completion_tokens == len(want["tokens"]) and got.usage.prompt_tokens == want["prompt_tokens"]


CHAT = "/v1/chat/completions"
OK_CHAT = {"model": ALIAS, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
AUTH = {"Authorization": f"Bearer {KEY}"}
INVALID = "invalid_request_error"
# (name, method, path, body, headers, status, error type)
MALFORMED = [
    ("malformed JSON", "POST", CHAT, b'{"model": "tiny", "messages": [', AUTH, 400, INVALID),
    ("body not an object", "POST", CHAT, b"[1, 2]", AUTH, 400, INVALID),
    ("not UTF-8", "POST", CHAT, b'{"model": "\xff"}', AUTH, 400, INVALID),
    ("no messages", "POST", CHAT, {"model": ALIAS}, AUTH, 400, INVALID),
    ("messages not a list", "POST", CHAT, OK_CHAT | {"messages": "hi"}, AUTH, 400, INVALID),
    ("empty messages", "POST", CHAT, OK_CHAT | {"messages": []}, AUTH, 400, INVALID),
    ("unknown role", "POST", CHAT, OK_CHAT | {"messages": [{"role": "wizard", "content": "hi"}]}, AUTH, 400, INVALID),
    ("content a number", "POST", CHAT, OK_CHAT | {"messages": [{"role": "user", "content": 7}]}, AUTH, 400, INVALID),
    ("image content", "POST", CHAT, OK_CHAT | {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, AUTH, 400, INVALID),
    ("temperature a string", "POST", CHAT, OK_CHAT | {"temperature": "hot"}, AUTH, 400, INVALID),
    ("temperature above 2", "POST", CHAT, OK_CHAT | {"temperature": 3}, AUTH, 400, INVALID),
    ("max_tokens 0", "POST", CHAT, OK_CHAT | {"max_tokens": 0}, AUTH, 400, INVALID),
    ("max_tokens a bool", "POST", CHAT, OK_CHAT | {"max_tokens": True}, AUTH, 400, INVALID),
    ("top_p 0", "POST", CHAT, OK_CHAT | {"top_p": 0}, AUTH, 400, INVALID),
    ("seed a float", "POST", CHAT, OK_CHAT | {"seed": 1.5}, AUTH, 400, INVALID),
    ("stop of numbers", "POST", CHAT, OK_CHAT | {"stop": [1, 2]}, AUTH, 400, INVALID),
    ("five stops", "POST", CHAT, OK_CHAT | {"stop": list("abcde")}, AUTH, 400, INVALID),
    ("n 2", "POST", CHAT, OK_CHAT | {"n": 2}, AUTH, 400, INVALID),
    ("stream not a bool", "POST", CHAT, OK_CHAT | {"stream": "yes"}, AUTH, 400, INVALID),
    ("stream_options without stream", "POST", CHAT, OK_CHAT | {"stream_options": {"include_usage": True}}, AUTH, 400, INVALID),
    ("logprobs", "POST", CHAT, OK_CHAT | {"logprobs": True}, AUTH, 400, INVALID),
    ("no model", "POST", CHAT, {"messages": OK_CHAT["messages"]}, AUTH, 400, INVALID),
    ("unknown model", "POST", CHAT, OK_CHAT | {"model": "gpt-4o"}, AUTH, 404, INVALID),
    ("prompt longer than the context", "POST", "/v1/completions", {"model": ALIAS, "prompt": "fox " * 5000}, AUTH, 400, INVALID),
    ("prompt a dict", "POST", "/v1/completions", {"model": ALIAS, "prompt": {"a": 1}}, AUTH, 400, INVALID),
    ("two prompts", "POST", "/v1/completions", {"model": ALIAS, "prompt": ["a", "b"]}, AUTH, 400, INVALID),
    ("token id outside the vocabulary", "POST", "/v1/completions", {"model": ALIAS, "prompt": [1, 10**9]}, AUTH, 400, INVALID),
    ("oversized body", "POST", CHAT, b'{"pad": "' + b"x" * (5 << 20) + b'"}', AUTH, 413, INVALID),
    ("no key", "POST", CHAT, OK_CHAT, {}, 401, "authentication_error"),
    ("wrong key", "POST", CHAT, OK_CHAT, {"Authorization": "Bearer sk-wrong"}, 401, "authentication_error"),
    ("a key of another scheme", "GET", "/v1/models", None, {"Authorization": f"Basic {KEY}"}, 401, "authentication_error"),
    ("unknown route", "GET", "/v1/engines", None, AUTH, 404, INVALID),
    ("wrong method", "GET", CHAT, None, AUTH, 405, INVALID),
]


def test_malformed_requests_get_openai_error_objects(server, client):
    for name, method, path, body, headers, status, kind in MALFORMED:
        got, _, raw = request(server.port, method, path, body, headers)
        error = json.loads(raw)["error"]
        assert (got, error["type"]) == (status, kind), f"{name}: {got} {error}"
        assert error["message"] and "Traceback" not in error["message"] and "\n" not in error["message"], name
    # the server still serves, and the client sees the same errors as exceptions
    assert client.chat.completions.create(model=ALIAS, messages=OK_CHAT["messages"], max_tokens=2).choices
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=OK_CHAT["messages"])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=ALIAS, prompt="fox " * 5000)


def test_eight_clients_twenty_requests_each_equal_alone(server, client):
    """Concurrent requests are batched (the metrics show steps of several rows) and each answer is
    what the same request gets alone; none is lost; /health still answers."""
    requests = [dict(prompt=f"{word} " * (1 + i % 7), max_tokens=8 + (i * 5) % 29, temperature=0.0 if i % 3 else 0.9,
                     seed=i, extra_body={"ignore_eos": i % 2 == 0})
                for i, word in enumerate(("fox", "café", "北京", "def", "12,345", "dog", "the", "Émile", "return", "a") * 2)]
    alone = [client.completions.create(model=ALIAS, **r).choices[0] for r in requests]
    steps0, tokens0 = server.metric("decode_steps_total", KEY), server.metric("decoded_tokens_total", KEY)
    got, errors = {}, []

    def worker(c: int) -> None:
        try:
            for j in range(len(requests)):
                i = (j + 3 * c) % len(requests)
                got[(c, i)] = client.completions.create(model=ALIAS, **requests[i]).choices[0]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    in_threads(worker, 8, timeout=600)
    assert not errors and len(got) == 8 * len(requests)
    for (c, i), choice in got.items():
        assert (choice.text, choice.finish_reason) == (alone[i].text, alone[i].finish_reason), (c, i)
    steps = server.metric("decode_steps_total", KEY) - steps0
    tokens = server.metric("decoded_tokens_total", KEY) - tokens0
    assert tokens > 1.5 * steps  # several sequences per step: batched, not in turn
    assert request(server.port, "GET", "/health")[0] == 200


def test_a_second_turn_reuses_the_first_turns_prompt(server, client):
    first = [{"role": "user", "content": "Tell me about the fox " * 4}]
    answer = client.chat.completions.create(model=ALIAS, messages=first, max_tokens=8, temperature=0)
    reused0 = server.metric("prompt_tokens_reused_total", KEY)
    second = first + [{"role": "assistant", "content": answer.choices[0].message.content},
                      {"role": "user", "content": "And the dog?"}]
    client.chat.completions.create(model=ALIAS, messages=second, max_tokens=4, temperature=0)
    assert server.metric("prompt_tokens_reused_total", KEY) - reused0 >= answer.usage.prompt_tokens


@pytest.fixture(scope="module")
def single(tiny_onnx, tmp_path_factory):
    """One sequence, no queue: what a cancelled stream must give back at once."""
    tmp = tmp_path_factory.mktemp("serve-single")
    s = Server(tiny_onnx["onnx"], "--metrics", "--max-sequences", 1, "--max-queue", 0, "--alias", ALIAS, log=tmp / "log")
    yield s
    s.stop()


def open_stream(port: int, max_tokens: int) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = {"model": ALIAS, "prompt": "fox", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    return conn, r


def read_chunks(response, n: int) -> list[dict]:
    chunks = []
    while len(chunks) < n:
        line = response.readline().decode().strip()
        if line.startswith("data: {"):
            chunks.append(json.loads(line[6:]))
    return chunks


def settled(server, name: str) -> float:
    """The metric once it has not changed for half a second."""
    last, still = server.metric(name), 0
    while still < 5:
        time.sleep(0.1)
        now = server.metric(name)
        still = still + 1 if now == last else 0
        last = now
    return last


def test_a_full_queue_answers_503_with_retry_after(single):
    conn, r = open_stream(single.port, 3000)
    read_chunks(r, 1)  # generating: the one sequence is taken
    status, headers, body = request(single.port, "POST", "/v1/completions", {"model": ALIAS, "prompt": "dog", "max_tokens": 2})
    conn.close()
    assert status == 503 and int(headers["retry-after"]) >= 1
    assert json.loads(body)["error"]["type"] == "server_error"
    assert settled(single, "running_sequences") == 0


def test_a_disconnect_after_two_chunks_stops_the_generation(single):
    decoded0 = single.metric("decoded_tokens_total")
    conn, r = open_stream(single.port, 3000)
    assert len(read_chunks(r, 2)) == 2
    conn.close()  # the client goes away
    # the token counter stops rising long before 3000 tokens (the tiny model decodes ~1K tokens/s)
    # (31 tokens here: the time the server takes to hear of the disconnect)
    assert settled(single, "decoded_tokens_total") - decoded0 < 500
    assert single.metric("running_sequences") == 0
    # and the one sequence serves the next request (no 503: nothing holds it)
    status, _, body = request(single.port, "POST", "/v1/completions", {"model": ALIAS, "prompt": "dog", "max_tokens": 3})
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] <= 3


def test_kv_store_keeps_prompts_across_restarts(tiny_onnx, tmp_path):
    prompt = {"model": ALIAS, "prompt": "The quick brown fox jumps over the lazy dog " * 6, "max_tokens": 4, "temperature": 0}
    answers = []
    for run in range(2):
        s = Server(tiny_onnx["onnx"], "--kv-store", tmp_path / "store", "--metrics", "--alias", ALIAS, log=tmp_path / f"{run}.log")
        try:
            status, _, body = request(s.port, "POST", "/v1/completions", prompt)
            assert status == 200
            answers.append(json.loads(body)["choices"][0]["text"])
            reused = s.metric("prompt_tokens_reused_total")
        finally:
            s.stop()
        assert (reused > 0) == (run == 1)  # the restarted server took the prompt from the store
    assert answers[0] == answers[1]


def test_the_torch_backend_serves_concurrent_requests_in_turn(tiny_onnx, tmp_path):
    s = Server(tiny_onnx["hf"], "--backend", "torch", "--metrics", "--alias", ALIAS, log=tmp_path / "log")
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
        prompts = ["fox", "dog " * 5, "café 北京"]
        alone = [client.completions.create(model=ALIAS, prompt=p, max_tokens=12, temperature=0).choices[0].text for p in prompts]
        got = {}
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, client.completions.create(
            model=ALIAS, prompt=prompts[i], max_tokens=12, temperature=0).choices[0].text)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [got[i] for i in range(3)] == alone
    finally:
        s.stop()


def test_a_public_address_without_a_key_warns_and_a_failed_load_exits_1(tmp_path):
    import subprocess
    import sys

    from serving import free_port

    p = subprocess.run([sys.executable, "-c", "from edgetok.cli import main; main()", "serve", str(tmp_path / "missing"),
                        "--host", "0.0.0.0", "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert "without an API key" in p.stderr and "edgetok: error:" in p.stderr and "Traceback" not in p.stderr


def test_the_openai_client_example_talks_to_the_server(server, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "key").write_text(KEY)
    example = Path(__file__).resolve().parents[2] / "examples" / "openai_client.py"
    p = subprocess.run([sys.executable, str(example), "--base-url", server.url + "/v1", "--api-key-file", str(tmp_path / "key")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert f"model: {ALIAS}" in p.stdout and "streamed: " in p.stdout and "second turn: " in p.stdout


def test_a_speculating_server_answers_as_plain_decoding(tiny_onnx, tmp_path):
    """`edgetok serve HF-FOLDER --speculate recycle --draft-width 2`: the default engine verifies draft
    trees through the server's scheduler, three requests at once; at temperature 0 each answer is
    `edgetok run`'s without speculation."""
    prompts = ["def add(a, b):\n    return a + b\n\ndef add(a, b):\n", "The quick brown fox", "Émile paid 12,345 €"]
    want = []
    for prompt in prompts:
        r = run_cli("run", tiny_onnx["hf"], "-p", prompt, "--json", "-n", 24, "--no-chat")
        assert r.exit_code == 0, r.output
        want.append(json.loads(r.stdout)["text"])
    s = Server(tiny_onnx["hf"], "--alias", ALIAS, "--speculate", "recycle", "--draft-width", 2, "--draft-max", 4, "--max-sequences", 4,
               "--metrics", log=tmp_path / "server.log")
    try:
        got: list = [None] * len(prompts)

        def ask(i: int) -> None:
            status, _, body = request(s.port, "POST", "/v1/completions", {
                "model": ALIAS, "prompt": prompts[i], "max_tokens": 24, "temperature": 0})
            got[i] = json.loads(body)["choices"][0]["text"] if status == 200 else body

        for _ in range(2):  # the second round: Token Recycling's table (kept by each engine) knows the answers
            in_threads(ask, len(prompts), timeout=120)
            assert got == want
        assert s.metric("accepted_tokens_total") > 0 and s.metric("drafted_tokens_total") > s.metric("accepted_tokens_total")
    finally:
        assert s.stop() in (0, 143)
