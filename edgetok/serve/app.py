"""The ASGI app (Starlette): OpenAI's routes over the scheduler and sequences.

GET /health (200, or 503 while the model loads), GET /v1/models, POST /v1/chat/completions and
/v1/completions (streamed as server-sent events, or not), GET /metrics (with --metrics). Every
error is OpenAI's error object with its status (schema.ApiError); an unexpected exception is a 500
whose details go to the server's log, never to the client, and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgetok.errors import EdgetokError
from edgetok.runtimes.engine import GenerationConfig, Result
from edgetok.serve import schema
from edgetok.serve.metrics import CONTENT_TYPE, Metrics
from edgetok.serve.scheduler import Cancelled, Scheduler
from edgetok.serve.schema import ApiError, CompletionRequest
from edgetok.serve.sequences import QueueFull, Sequences
from edgetok.serve.sequences import Request as Generation

log = logging.getLogger("edgetok.serve")
MAX_BODY_BYTES = 4 << 20  # a long chat at a 8K context is ~50 KB of JSON
PING_S = 5.0  # SSE comment pings while a stream waits (a long prefill, a queue)
RETRY_AFTER_S = 1  # a full queue's Retry-After
DISCONNECT_POLL_S = 0.25  # a non-streamed request checks this often whether its client left


@dataclass(frozen=True)
class ServeConfig:
    alias: str  # the model's id in /v1/models and requests
    api_key: str | None = None
    max_sequences: int = 4
    max_queue: int = 16
    metrics: bool = False
    max_body_bytes: int = MAX_BODY_BYTES

    def __post_init__(self) -> None:
        for name in ("max_sequences", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EdgetokError(f"{name.replace('_', '-')} must be a whole number ≥ 1, not {value!r}")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise EdgetokError(f"--max-queue must be a whole number ≥ 0, not {self.max_queue!r}")
        if not isinstance(self.alias, str) or not self.alias:
            raise EdgetokError("--alias must be a non-empty name")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise EdgetokError("the API key is empty")


class Service:
    """A loaded model and what serves it."""

    def __init__(self, model, config: ServeConfig, defaults: GenerationConfig) -> None:
        self.model, self.defaults = model, defaults
        backend = model.engine.backend
        self.scheduler = Scheduler(backend)
        self.sequences = Sequences(self.scheduler, model.tokenizer, model.engine.store_factory,
                                   config.max_sequences, config.max_queue, model.engine.long_prompts)
        self.metrics = Metrics(self.scheduler, self.sequences)
        self.created = int(time.time())

    def close(self) -> None:
        self.scheduler.close()


class _State:
    def __init__(self) -> None:
        self.service: Service | None = None
        self.error: BaseException | None = None  # the load failed
        self.loaded = threading.Event()


def create_app(config: ServeConfig, load: Callable[[], Service], on_load_error: Callable[[BaseException], None] | None = None
               ) -> Starlette:
    """The app; `load` runs in a thread when it starts (GET /health says 503 until it is done)."""
    state = _State()

    def loader() -> None:
        try:
            state.service = load()
        except BaseException as e:  # the CLI reports it and stops the server
            state.error = e
            if on_load_error is not None:
                on_load_error(e)
        finally:
            state.loaded.set()

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=loader, name="edgetok-load", daemon=True).start()
        yield
        if state.service is not None:
            state.service.close()

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "no API key: send 'Authorization: Bearer KEY'", "authentication_error", code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), config.api_key.encode()):
            raise ApiError(401, "the API key is not this server's", "authentication_error", code="invalid_api_key")

    def service() -> Service:
        if state.service is None:
            raise ApiError(503, "the model is still loading" if state.error is None else "the model failed to load",
                           "server_error", code="model_loading", headers={"Retry-After": str(RETRY_AFTER_S)})
        return state.service

    def api(endpoint: str, needs_key: bool = True):
        """A route: the key checked, every error an OpenAI error object, every answer counted."""

        def wrap(handler):
            async def route(request: Request) -> Response:
                try:
                    if needs_key:
                        authorize(request)
                    response = await handler(request)
                except ApiError as e:
                    response = JSONResponse(e.body(), e.status, headers=e.headers)
                except ClientDisconnect:
                    response = Response(status_code=499)
                except Exception:
                    log.exception("error while serving %s", request.url.path)
                    response = JSONResponse(ApiError(500, "the server failed on this request (its log says why)",
                                                     "server_error").body(), 500)
                if state.service is not None:
                    state.service.metrics.count(endpoint, response.status_code)
                return response

            return route

        return wrap

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            raise ApiError(413, f"the request body is larger than {config.max_body_bytes} bytes", code="request_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > config.max_body_bytes:
                raise ApiError(413, f"the request body is larger than {config.max_body_bytes} bytes", code="request_too_large")
        return schema.parse_body(bytes(body))

    @api("health", needs_key=False)
    async def health(request: Request) -> Response:
        if state.service is None:
            status = "loading" if state.error is None else "failed"
            return JSONResponse({"status": status}, 503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"status": "ok"})

    @api("models")
    async def models(request: Request) -> Response:
        s = service()
        return JSONResponse({"object": "list", "data": [
            {"id": config.alias, "object": "model", "created": s.created, "owned_by": "edgetok"}]})

    @api("metrics")
    async def metrics(request: Request) -> Response:
        if not config.metrics:
            raise ApiError(404, "metrics are off: start the server with --metrics", code="not_found")
        return Response(service().metrics.text(), media_type=CONTENT_TYPE)

    async def completion(request: Request, chat: bool) -> Response:
        s = service()
        req = schema.parse_request(await read_json(request), chat, s.defaults)
        if req.model != config.alias:
            raise ApiError(404, f"the model '{req.model}' does not exist here; this server serves '{config.alias}'",
                           param="model", code="model_not_found")
        if chat and not s.model.has_chat_template:
            raise schema.invalid(f"{config.alias} has no chat template; use /v1/completions", "messages")
        try:
            ids = req.prompt if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], int) \
                else s.model.encode(req.prompt, chat=chat)
        except EdgetokError as e:
            raise schema.invalid(str(e), "messages" if chat else "prompt") from None
        ctx, vocab = s.model.config.max_context, s.model.config.vocab_size
        if not ids:
            raise schema.invalid("the prompt is empty", "messages" if chat else "prompt")
        if len(ids) >= ctx:
            raise schema.invalid(f"the prompt is {len(ids)} tokens, but the model's context holds {ctx} "
                                 f"(with room for 1 new token)", "messages" if chat else "prompt", "context_length_exceeded")
        if max(ids) >= vocab:
            raise schema.invalid(f"token id {max(ids)} is outside the vocabulary (0 to {vocab - 1})", "prompt")
        call = _Call(s, req, ids, chat, config.alias)
        try:
            s.sequences.submit(call.generation)
        except QueueFull as e:
            raise ApiError(503, str(e), "server_error", code="overloaded", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        if req.stream:
            return EventSourceResponse(call.events(), ping=PING_S, send_timeout=30)
        return JSONResponse(await call.whole(request))

    @api("chat.completions")
    async def chat_completions(request: Request) -> Response:
        return await completion(request, chat=True)

    @api("completions")
    async def completions(request: Request) -> Response:
        return await completion(request, chat=False)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        """Unknown routes and methods: OpenAI's error object too."""
        e = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code="not_found"
                     if exc.status_code == 404 else None)
        if state.service is not None:
            state.service.metrics.count("other", exc.status_code)
        return JSONResponse(e.body(), exc.status_code, headers=getattr(exc, "headers", None))

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.edgetok = state
    return app


class _Call:
    """One request's generation, its pieces carried from the generating thread to the event loop."""

    def __init__(self, service: Service, req: CompletionRequest, ids: list[int], chat: bool, model: str) -> None:
        self.req, self.chat, self.model = req, chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.generation = Generation(ids, req.config, self._emit)

    def _emit(self, item) -> None:  # on the generating thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    @staticmethod
    def _check(item):
        """A queue item → itself, or None when the generation was cancelled; raises for an error."""
        if isinstance(item, Cancelled):
            return None
        if isinstance(item, EdgetokError):
            raise schema.invalid(str(item))
        if isinstance(item, BaseException):
            raise item
        return item

    async def _items(self):
        """Text pieces, then the Result; raises what the generation raised. Leaving early (the client
        went away: the task is cancelled, or the generator closed) cancels the generation."""
        try:
            while (item := self._check(await self.queue.get())) is not None:
                yield item
                if isinstance(item, Result):
                    return
        finally:
            self.generation.cancel()  # (a no-op once it has ended)

    def _usage(self, result: Result) -> dict:
        n = len(result.tokens)
        return {"prompt_tokens": result.prompt_tokens, "completion_tokens": n, "total_tokens": result.prompt_tokens + n}

    def _chunk(self, delta: dict | None = None, text: str | None = None, finish: str | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": delta if delta is not None else {}, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        chunk = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}
        if self.req.include_usage:
            chunk["usage"] = None
        return chunk

    async def events(self):
        """Server-sent events: (chat: a role chunk,) content chunks, the finish chunk, the usage
        chunk when asked for, then [DONE]. An error after the stream began is an error event."""
        def event(data: dict) -> dict:
            return {"data": json.dumps(data, ensure_ascii=False)}

        try:
            if self.chat:
                yield event(self._chunk({"role": "assistant", "content": ""}))
            async for item in self._items():
                if isinstance(item, Result):
                    yield event(self._chunk({}, "", schema.finish_reason(item.finish_reason)))
                    if self.req.include_usage:
                        usage = self._chunk() | {"choices": [], "usage": self._usage(item)}
                        yield event(usage)
                elif item:
                    yield event(self._chunk({"content": item}, item))
            yield {"data": "[DONE]"}
        except ApiError as e:
            yield event(e.body())
        except Exception:
            log.exception("error while streaming")
            yield event(ApiError(500, "the server failed on this request (its log says why)", "server_error").body())

    async def whole(self, request: Request) -> dict:
        """The whole answer; a client that leaves meanwhile cancels the generation."""
        pieces, result = [], None
        try:
            while result is None:
                try:
                    item = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise ClientDisconnect() from None
                    continue
                if (item := self._check(item)) is None:
                    raise ClientDisconnect()
                if isinstance(item, Result):
                    result = item
                else:
                    pieces.append(item)
        finally:
            self.generation.cancel()  # (a no-op once it has ended)
        text = "".join(pieces)
        finish = schema.finish_reason(result.finish_reason)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.model, "choices": [choice], "usage": self._usage(result)}
