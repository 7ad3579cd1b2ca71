"""The ASGI app in this process: /health says 503 while the model loads, then 200."""

from __future__ import annotations

import threading
import time

import openai
import uvicorn
from serving import free_port, request

import edgetok
from edgetok.runtimes.engine import GenerationConfig
from edgetok.serve.app import ServeConfig, Service, create_app


def test_health_is_503_while_the_model_loads(tiny_folder):
    model = edgetok.load(str(tiny_folder))
    config = ServeConfig("tiny")
    release = threading.Event()

    def load() -> Service:
        assert release.wait(60)
        return Service(model, config, GenerationConfig(max_new_tokens=4))

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config, load), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        status, headers, _ = request(port, "GET", "/health")
        assert status == 503 and "retry-after" in headers
        status, _, body = request(port, "POST", "/v1/completions", {"model": "tiny", "prompt": "fox"})
        assert status == 503 and b"loading" in body
        release.set()
        while request(port, "GET", "/health")[0] != 200:
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        done = client.completions.create(model="tiny", prompt="fox")  # the server's default: 4 tokens
        assert done.usage.completion_tokens <= 4
    finally:
        server.should_exit = True
        thread.join(timeout=30)
