"""The same service scaled out on Ray Serve: replicas of `create_app`, each loading the bundle in
its own process, with Ray's replica count or autoscaling config, behind a router that retries a
request on another replica when the one running it dies.

    from ray import serve
    serve.run(ray_application("bundles/dates", num_replicas=2), route_prefix="/")

or `ferry serve BUNDLE --ray --replicas 2`. Needs `pip install 'ferry[ray]'`.

Ray's HTTP proxy hands each request to the `Router` deployment, which hands it, whole, to a
`ModelReplica` through a deployment handle (Ray picks the replica) and relays the response as
it comes. A replica that dies takes none of its requests with it: Ray's handle raises
`RayActorError` for each, and the router sends the request again (`RETRIES` times at most, to
whichever replica Ray picks next; every ferry endpoint is a pure function of its request). A
response cut part-way — a stream — is resumed from the new replica's response past the bytes the
client already has, when they agree (greedy or seeded generation); otherwise it ends there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ferry.errors import FerryError
from ferry.runtime.serve.limits import ServeLimits

RETRIES = 3  # sends of a request after the first, each when a replica died running it
RETRY_DELAY_S = 0.2  # before the n-th retry, n times this (Ray replaces the dead replica)
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
log = logging.getLogger("ferry.serve")


class ModelReplica:
    """One replica: the bundle loaded in this process, served by `create_app` (its own
    batcher, limits and metrics), started and drained with the replica. `forward` runs one
    request through that app in-process."""

    async def __init__(self, bundle: str, backend: str, load_options: dict,
                       limits: ServeLimits, name: str) -> None:
        from ferry.runtime import load
        from ferry.runtime.serve.app import create_app

        self.served = create_app(load(bundle, backend, **load_options), limits=limits,
                                 name=name)
        # the app's lifespan (warm-up, batcher; drained on shutdown): one HTTP ingress per
        # Ray application, so Ray does not run this one's
        self.lifespan = self.served.router.lifespan_context(self.served)
        await self.lifespan.__aenter__()

    async def __del__(self) -> None:
        await self.lifespan.__aexit__(None, None, None)

    async def forward(self, request: dict) -> AsyncIterator[dict | bytes]:
        """Answer one HTTP request (`Router.relay`'s dict: method, path, query_string,
        headers, body): yields the response's start, {"status", "headers"}, then its body
        chunks as the app sends them. Cancelled (the client left): the app sees a
        disconnect."""
        messages: asyncio.Queue = asyncio.Queue()
        left = asyncio.Event()
        body = [request["body"]]

        async def receive() -> dict:
            if body:
                return {"type": "http.request", "body": body.pop(), "more_body": False}
            await left.wait()
            return {"type": "http.disconnect"}

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "scheme": "http", "method": request["method"], "path": request["path"],
                 "raw_path": request["path"].encode(), "root_path": "",
                 "query_string": request["query_string"], "headers": request["headers"],
                 "client": ("ray-router", 0), "server": ("ray-replica", 0)}
        app = asyncio.create_task(self.served(scope, receive, messages.put))
        app.add_done_callback(lambda done: messages.put_nowait(None))
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    yield {"status": message["status"], "headers": message.get("headers", [])}
                elif message.get("body"):
                    yield message["body"]
            app.result()
        finally:
            left.set()
            app.cancel()


class Resender:
    """Sends a request to a replica by `send(message)` (an async iterator of the response:
    its start, then its body chunks) and sends it again, `retries` times at most, when the
    replica running it dies (`RayActorError`), waiting `delay_s` × the attempt before each."""

    def __init__(self, send: Callable[[dict], AsyncIterator], *, retries: int = RETRIES,
                 delay_s: float = RETRY_DELAY_S) -> None:
        self.send, self.retries, self.delay_s = send, retries, delay_s

    async def start(self, message: dict, attempt: int = 0
                    ) -> tuple[AsyncIterator, dict, int]:
        """(the response, its start, the attempt that gave them: how often it was sent
        again); the last `RayActorError` once the retries are spent."""
        while True:
            try:
                responses = self.send(message)
                return responses, await anext(responses), attempt
            except RayActorError:
                attempt += 1
                if attempt > self.retries:
                    raise
                log.warning("a replica died running %s %s; sending it again (%d/%d)",
                            message["method"], message["path"], attempt, self.retries)
                await asyncio.sleep(self.delay_s * attempt)

    async def body(self, message: dict, responses: AsyncIterator, attempt: int = 0
                   ) -> AsyncIterator[bytes]:
        """The body chunks; when the replica dies part-way, the rest from a resent request's
        answer, past the bytes already given, while both answers agree (else it ends there,
        as it does once the retries are spent)."""
        sent = b""
        while True:
            received = b""
            try:
                async for chunk in responses:
                    received += chunk
                    if received[:len(sent)] != sent[:len(received)]:
                        log.warning("the answer resent after a replica died differs from the "
                                    "one begun (sampling?); ending %s there", message["path"])
                        return
                    if len(received) > len(sent):
                        new, sent = received[len(sent):], received
                        yield new
                return
            except RayActorError:
                try:
                    responses, _, attempt = await self.start(message, attempt + 1)
                except RayActorError:
                    log.warning("no replica finished %s; its body ends early", message["path"])
                    return


@serve.ingress()
class Router:
    """The HTTP entry: every request relayed to a `ModelReplica`, sent again to another when
    the one running it dies (`Resender`)."""

    def __init__(self, model: DeploymentHandle, max_body_bytes: int) -> None:
        streaming = model.options(stream=True)
        self.resender = Resender(lambda message: streaming.forward.remote(message))
        self.max_body_bytes = max_body_bytes

    def __serve_build_asgi_app__(self):
        return Starlette(routes=[Route("/{path:path}", self.relay, methods=METHODS)])

    async def relay(self, request: Request) -> Response:
        """The replica's answer to `request`, streamed through as it comes; a header
        `x-ferry-resent: N` tells a request sent again N times."""
        body = b""
        async for chunk in request.stream():  # past the limit: the replica answers 413
            body += chunk
            if len(body) > self.max_body_bytes:
                break
        message = {"method": request.method, "path": request.url.path,
                   "query_string": request.url.query.encode(),
                   "headers": request.headers.raw, "body": body}
        try:
            responses, start, attempt = await self.resender.start(message)
        except RayActorError as error:
            return JSONResponse({"error": {
                "message": f"no replica could answer ({RETRIES + 1} tries): {error}",
                "type": "server_error", "code": 503}}, status_code=503,
                headers={"Retry-After": "1"})
        response = StreamingResponse(self.resender.body(message, responses, attempt))
        response.status_code = start["status"]
        response.raw_headers = [(bytes(k), bytes(v)) for k, v in start["headers"]]
        if attempt:
            response.raw_headers.append((b"x-ferry-resent", str(attempt).encode()))
        return response


def ray_application(bundle: str | Path, *, backend: str = "onnxruntime",
                    load_options: dict | None = None, limits: ServeLimits | None = None,
                    num_replicas: int = 1, autoscaling_config: dict | None = None,
                    ray_actor_options: dict | None = None, name: str = "ferry"):
    """A Ray Serve application of `bundle`: `num_replicas` `ModelReplica`s (or Ray's
    `autoscaling_config`, e.g. {"min_replicas": 1, "max_replicas": 4}), each running the app
    `create_app` builds on a model it loads itself (`ray_actor_options`, e.g. {"num_cpus": 2},
    size each replica), behind one `Router` that resends a request whose replica died."""
    path = Path(bundle).resolve()
    if not path.is_dir():
        raise FerryError(f"bundle {bundle} does not exist; create one with `ferry export onnx`")
    limits = limits or ServeLimits()
    scaling = ({"autoscaling_config": autoscaling_config} if autoscaling_config
               else {"num_replicas": num_replicas})
    replicas = serve.deployment(ModelReplica, name=f"{name}-model",
                                ray_actor_options=ray_actor_options or {}, **scaling)
    router = serve.deployment(Router, name=name, ray_actor_options={"num_cpus": 0})
    return router.bind(replicas.bind(str(path), backend, dict(load_options or {}), limits,
                                     path.name), limits.max_body_bytes)
