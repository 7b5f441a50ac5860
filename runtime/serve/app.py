"""The HTTP face of a served bundle: ferry's own endpoints, an OpenAI-style `/v1/completions`,
health, readiness, metrics, and the limits of `ServeLimits` turned into 4xx / 503 / 504 JSON
errors. Every request goes through one `RequestBatcher`: streamed generations too (batched with
each other, each piece handed to its own request), up to `max_streams` at once.

The POST endpoints (the model's work) are answered straight from ASGI (`ServedApp`), the rest
(health, readiness, metrics, models, unknown paths) by FastAPI: FastAPI's per-request machinery
(middleware stack, routing, dependency solving, response encoding) cost ~0.1 ms of the event
loop's CPU per request, which on the 2-core test VM serving the demo model at 32 clients was
time the model's steps waited for (the GIL) or shared a core with."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from ferry.errors import FerryError
from ferry.runtime.serve.batcher import QueueFull, RequestBatcher
from ferry.runtime.serve.limits import ServeLimits
from ferry.runtime.serve.metrics import ServeMetrics
from ferry.runtime.serve.service import Completion, ModelService, StreamSink
from ferry.runtime.tokenization import text_list

OPEN_PATHS = {"/health", "/ready"}  # answered without the API key (load balancers' probes)
# OpenAI completion fields that change the output and that ferry does not implement
OPENAI_REFUSED = {"logprobs": None, "echo": False, "best_of": None, "suffix": None,
                  "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0}
OPENAI_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
                 "stream", "user", *OPENAI_REFUSED}


class HttpError(Exception):
    """An error answered with `status` and a JSON body naming it."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class ClientLeft(Exception):
    """The client disconnected before its answer was ready."""


# a POST endpoint: (the request's JSON body, its ASGI receive) → the response
PostHandler = Callable[[Any, Receive], Awaitable[Response]]
log = logging.getLogger("ferry.serve")


class ServedApp(FastAPI):
    """FastAPI with the service's POST endpoints (`posts`) answered before its middleware
    stack and router: each one's body read and parsed as JSON (`max_body_bytes`), a HttpError
    or FerryError turned into its JSON error, anything else into a logged 500. Every request,
    either way: the API key checked (but on `OPEN_PATHS`), counted and timed by its route, and
    answered with the `x-ferry-instance` header naming this server (one of several replicas
    behind a proxy)."""

    def __init__(self, *, api_key: str | None, metrics: ServeMetrics, max_body_bytes: int,
                 **fastapi_options) -> None:
        super().__init__(**fastapi_options)
        self.posts: dict[str, PostHandler] = {}
        self.api_key, self.metrics, self.max_body_bytes = api_key, metrics, max_body_bytes
        self.instance = uuid.uuid4().hex[:12].encode()

    def post_endpoint(self, path: str) -> Callable[[PostHandler], PostHandler]:
        """Register `handler(body, receive)` as the POST endpoint at `path` (a decorator)."""
        def register(handler: PostHandler) -> PostHandler:
            self.posts[path] = handler
            return handler

        return register

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan
            await super().__call__(scope, receive, send)
            return
        started = time.perf_counter()
        status, path = 500, scope["path"]
        handler = self.posts.get(path)
        endpoint = path if handler is not None else "unrouted"
        headers = dict(scope["headers"])

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-ferry-instance", self.instance)]}
            await send(message)

        try:
            if self.api_key is not None and path not in OPEN_PATHS:
                error = _api_key_error(headers.get(b"authorization", b""), self.api_key)
                if error is not None:
                    await _error_response(error)(scope, receive, sending)
                    return
            if handler is None:
                await super().__call__(scope, receive, sending)
                route = scope.get("route")  # label by route, not by any path a client sends
                endpoint = route.path if route is not None else "unrouted"
            elif scope["method"] != "POST":
                await _error_response(HttpError(405, "Method Not Allowed",
                                                {"Allow": "POST"}))(scope, receive, sending)
            else:
                await self._answer(handler, scope, headers, receive, sending)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    async def _answer(self, handler: PostHandler, scope: Scope, headers: dict[bytes, bytes],
                      receive: Receive, send: Send) -> None:
        try:
            response = await handler(await self._body(headers, receive), receive)
        except ClientLeft:  # nobody to answer; its rows were let go
            return
        except HttpError as error:
            response = _error_response(error)
        except FerryError as error:
            response = _error_response(HttpError(400, str(error)))
        except Exception as error:  # noqa: BLE001 - answered, and logged for the operator
            log.exception("%s failed", scope["path"])
            response = _error_response(HttpError(500, f"internal error ({type(error).__name__}"
                                                      "); see the server's log"))
        await response(scope, receive, send)

    async def _body(self, headers: dict[bytes, bytes], receive: Receive) -> Any:
        """The request's JSON body, within `max_body_bytes`."""
        limit = self.max_body_bytes
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            raise HttpError(413, f"the request body has {int(declared)} bytes; this server's "
                                 f"limit max_body_bytes is {limit}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientLeft
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"the request body exceeds this server's limit "
                                     f"max_body_bytes ({limit})")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        try:
            return json.loads(b"".join(chunks) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise HttpError(400, f"the request body is not valid JSON ({error})") from None


def create_app(model, *, limits: ServeLimits | None = None, name: str | None = None,
               warm_up: bool = True) -> ServedApp:
    """An ASGI app (a FastAPI) serving `model` (what `ferry.runtime.load` returns) under
    `limits`.

    Args:
        name: the model's name in `/v1/models` and completions (default: the bundle's folder).
        warm_up: run one small call per capability before `/ready` answers 200.
    """
    limits = limits or ServeLimits()
    service = ModelService(model, limits)
    metrics = ServeMetrics()
    bundle = getattr(model, "bundle", None)
    name = name or (bundle.path.name if bundle is not None else "ferry-model")
    ready, failures = threading.Event(), []
    streams = threading.BoundedSemaphore(limits.max_streams)
    state: dict[str, RequestBatcher] = {}

    def warm() -> None:
        try:
            service.warm_up()
            ready.set()
        except Exception as error:  # noqa: BLE001 - /ready reports it; the process stays up
            failures.append(f"{type(error).__name__}: {error}")
            log.exception("warm-up failed")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["batcher"] = RequestBatcher(service.run, max_batch=limits.max_batch,
                                          max_wait_ms=limits.max_wait_ms,
                                          max_join_wait_ms=limits.max_join_wait_ms,
                                          max_queue=limits.max_queue,
                                          on_batch=metrics.batch_size.observe,
                                          continuous=service.continuous,
                                          run_continuous=service.run_continuous)
        if warm_up:
            threading.Thread(target=warm, name="ferry-warm-up", daemon=True).start()
        else:
            ready.set()
        try:
            yield
        finally:  # uvicorn stops taking connections first; the waiting requests still finish
            state["batcher"].close(timeout=limits.timeout_s)

    app = ServedApp(api_key=limits.api_key, metrics=metrics,
                    max_body_bytes=limits.max_body_bytes, title=f"ferry: {name}",
                    lifespan=lifespan)

    @app.exception_handler(HttpError)
    async def http_error(request: Request, error: HttpError):
        return _error_response(error)

    @app.exception_handler(HTTPException)  # 404 / 405 in the same JSON shape as the rest
    async def routing_error(request: Request, error: HTTPException):
        return _error_response(HttpError(error.status_code, str(error.detail)))

    def submitted(key, inputs: list[Any]):
        """The batcher's future of a checked request; 503 when its queue is full."""
        try:
            future = state["batcher"].submit(key, inputs)
        except QueueFull as full:
            raise HttpError(503, f"the server is busy ({full}); retry shortly",
                            {"Retry-After": "1"}) from None
        metrics.queue_depth.set(state["batcher"].depth)
        return future

    async def batched(endpoint: str, body: Any, receive: Receive) -> list[Any]:
        """The results of a checked request's inputs, once its batch computed them; its rows
        let go (not computed, or leaving a running batch) when its client disconnects or its
        time is up."""
        checked = service.check(endpoint, body)
        future = submitted(checked.key, checked.inputs)
        answer = asyncio.wrap_future(future)
        left = asyncio.ensure_future(_disconnected(receive))
        try:
            done, _ = await asyncio.wait((answer, left), timeout=limits.timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:  # cancelled too: the server is stopping
            left.cancel()
        if answer in done:
            return answer.result()
        future.cancel()
        if left in done:
            raise ClientLeft
        raise HttpError(504, f"the request took longer than this server's limit timeout_s "
                             f"({limits.timeout_s:g} s)")

    async def streamed(key, text: str) -> AsyncIterator[str]:
        """One request's pieces of a batched stream, as the worker hands them over."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        finished = object()  # queued after the last piece (the row ended, or the batch did)
        sink = StreamSink(lambda piece: loop.call_soon_threadsafe(queue.put_nowait, piece),
                          lambda: loop.call_soon_threadsafe(queue.put_nowait, finished))
        future = submitted(key, [(text, sink)])
        future.add_done_callback(
            lambda done: loop.call_soon_threadsafe(queue.put_nowait, finished))
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), limits.timeout_s)
                except asyncio.TimeoutError:
                    raise HttpError(504, f"no piece came within this server's limit timeout_s "
                                         f"({limits.timeout_s:g} s)") from None
                if item is finished:
                    break
                yield item
            if future.done() and not future.cancelled() and future.exception() is not None:
                raise future.exception()
        finally:  # the client left or the stream ended: its row is not fed any more
            sink.gone = True
            future.cancel()

    def count_tokens(completions: list[Completion]) -> None:
        metrics.generated_tokens.inc(sum(c.completion_tokens for c in completions))

    # ---------------------------------------------------------------- service endpoints

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def readiness():
        if failures:
            raise HttpError(503, f"the warm-up call failed ({failures[0]}); see the log")
        if not ready.is_set():
            raise HttpError(503, "warming up", {"Retry-After": "1"})
        return {"ready": True}

    @app.get("/metrics")
    async def metrics_text():
        metrics.queue_depth.set(state["batcher"].depth)
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(name, model, service)]}

    # ---------------------------------------------------------------- ferry's endpoints

    if "generate" in service.capabilities:
        @app.post_endpoint("/generate")
        async def generate(body: Any, receive: Receive) -> Response:
            completions = await batched("generate", body, receive)
            count_tokens(completions)
            return JSONResponse({"outputs": [c.text for c in completions],
                                 "finish_reasons": [c.finish_reason for c in completions],
                                 "usage": _usage(completions)})

        @app.post_endpoint("/generate/stream")
        async def generate_stream(body: Any, receive: Receive) -> Response:
            key, text = service.check_stream(body)
            pieces = streamed(key, text)

            async def events() -> AsyncIterator[str]:
                async for piece in pieces:
                    yield f"data: {json.dumps({'text': piece})}\n\n"
                yield "data: [DONE]\n\n"

            return _event_stream(await _first_started(events(), streams, metrics), streams)

    for endpoint in ("classify", "tag", "answer"):
        if endpoint in service.capabilities:
            app.post_endpoint(f"/{endpoint}")(_task_route(endpoint, batched))

    # ---------------------------------------------------------------- OpenAI-style

    async def openai(body: Any, receive: Receive, *, chat: bool) -> Response:
        """An OpenAI completion (`chat`: chat completion) request answered."""
        parameters, stream = _openai_request(body, chat=chat)
        if chat:  # the conversation rendered by the bundle's chat template, specials as text
            prompts = [service.generator.chat_prompt(body.get("messages"))]
        else:
            prompts = text_list(body.get("prompt"), "prompt")
        created, ident = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        kind = "chat.completion" if chat else "text_completion"
        generation = {"inputs": prompts, "parameters": parameters,
                      "add_special_tokens": not chat}
        if stream:
            if len(prompts) != 1 or parameters.get("num_return_sequences", 1) != 1:
                raise FerryError("stream=true takes one prompt and n=1")
            key, text = service.check_stream({**generation, "inputs": prompts[0]})
            pieces = streamed(key, text)

            async def chunks() -> AsyncIterator[str]:
                async for piece in pieces:
                    choice = ({"delta": {"role": "assistant", "content": piece}} if chat
                              else {"text": piece, "logprobs": None})
                    yield "data: " + json.dumps({
                        "id": ident, "object": kind + (".chunk" if chat else ""),
                        "created": created, "model": name,
                        "choices": [{**choice, "index": 0, "finish_reason": None}]}) + "\n\n"
                yield "data: [DONE]\n\n"

            return _event_stream(await _first_started(chunks(), streams, metrics), streams)
        done = await batched("generate", generation, receive)
        count_tokens(done)
        choices = []
        for completion in done:
            texts = completion.text if isinstance(completion.text, list) else [completion.text]
            for text in texts:
                answer = ({"message": {"role": "assistant", "content": text}} if chat
                          else {"text": text, "logprobs": None})
                choices.append({**answer, "index": len(choices),
                                "finish_reason": completion.finish_reason})
        return JSONResponse({"id": ident, "object": kind, "created": created, "model": name,
                             "choices": choices, "usage": _usage(done)})

    if "generate" in service.capabilities:
        @app.post_endpoint("/v1/completions")
        async def completions(body: Any, receive: Receive) -> Response:
            return await openai(body, receive, chat=False)

    if "chat" in service.capabilities:
        @app.post_endpoint("/v1/chat/completions")
        async def chat_completions(body: Any, receive: Receive) -> Response:
            return await openai(body, receive, chat=True)

    return app


# -------------------------------------------------------------------- helpers


def _api_key_error(authorization: bytes, api_key: str) -> HttpError | None:
    scheme, _, token = authorization.partition(b" ")
    if scheme.lower() != b"bearer" or not hmac.compare_digest(token, api_key.encode()):
        return HttpError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'",
                         {"WWW-Authenticate": "Bearer"})
    return None


def _error_response(error: HttpError) -> JSONResponse:
    kind = "invalid_request_error" if error.status < 500 else "server_error"
    return JSONResponse({"error": {"message": error.message, "type": kind,
                                   "code": error.status}},
                        status_code=error.status, headers=error.headers)


def _usage(completions: list[Completion]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in completions)
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated,
            "total_tokens": prompt + generated}


def _model_card(name: str, model, service: ModelService) -> dict:
    bundle = getattr(model, "bundle", None)
    card = {"id": name, "object": "model", "owned_by": "ferry", "backend": model.backend,
            "capabilities": service.capabilities}
    if bundle is not None:
        manifest = bundle.manifest
        card.update(created=manifest.created, architecture=manifest.architecture,
                    task=manifest.task, variants=sorted(manifest.variants),
                    imported_from=manifest.imported_from)
    return card


def _task_route(endpoint: str, batched) -> PostHandler:
    async def route(body: Any, receive: Receive) -> Response:
        return JSONResponse({"results": await batched(endpoint, body, receive)})

    return route


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has disconnected (its request body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _openai_request(body: Any, *, chat: bool) -> tuple[dict, bool]:
    """(generation arguments, stream) of an OpenAI (chat) completion request."""
    if not isinstance(body, dict):
        raise FerryError("the request body must be a JSON object")
    known = OPENAI_FIELDS - {"prompt"} | {"messages"} if chat else OPENAI_FIELDS
    unknown = sorted(set(body) - known)
    if unknown:
        raise FerryError(f"unknown field(s) {unknown}; expected some of {sorted(known)}")
    for key, neutral in OPENAI_REFUSED.items():
        if body.get(key, neutral) != neutral:
            raise FerryError(f"{key} is not supported by ferry's OpenAI-style endpoints")
    temperature = body.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise FerryError(f"temperature must be a number, got {temperature!r}")
    parameters: dict[str, Any] = {"max_new_tokens": body.get("max_tokens", 16)}
    if temperature == 0:  # OpenAI's temperature 0: the most likely token each step
        parameters["do_sample"] = False
    else:  # OpenAI samples from the whole distribution: no top-k
        parameters.update(do_sample=True, temperature=temperature, top_k=0,
                          top_p=body.get("top_p", 1.0))
        if body.get("seed") is not None:
            parameters["seed"] = body["seed"]
    if body.get("n", 1) != 1:
        parameters["num_return_sequences"] = body["n"]
    stop = body.get("stop")
    if stop is not None:
        parameters["stop_strings"] = [stop] if isinstance(stop, str) else stop
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise FerryError(f"stream must be true or false, got {stream!r}")
    return parameters, stream


async def _first_started(events: AsyncIterator[str], streams: threading.BoundedSemaphore,
                         metrics: ServeMetrics) -> AsyncIterator[str]:
    """`events` once a stream slot is free (503 otherwise) and its first event has come (so
    that a bad request is a 4xx JSON error, not a broken stream)."""
    if not streams.acquire(blocking=False):
        raise HttpError(503, "all stream slots are busy; retry shortly", {"Retry-After": "1"})
    started = time.perf_counter()
    try:
        first = await anext(events, None)
    except BaseException:
        streams.release()
        raise
    metrics.first_piece.observe(time.perf_counter() - started)

    async def joined() -> AsyncIterator[str]:
        if first is not None:
            yield first
        async for event in events:
            yield event

    return joined()


def _event_stream(events: AsyncIterator[str], streams: threading.BoundedSemaphore
                  ) -> StreamingResponse:
    async def released() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        finally:
            streams.release()

    return StreamingResponse(released(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})
