"""The HTTP API of `difflora serve`: a FastAPI application over an Engine.

    POST /generate  {prompt, negative_prompt, adapters: "style:0.7,subject:0.3", seed, steps, width, height,
                     guidance, scheduler, num_images, format: "png" | "json"}
                    -> the PNG (with its A1111 `parameters` chunk), or JSON {images: [base64 PNG], parameters,
                       seeds, adapters, model, mode, timings}
    GET /adapters   adapters available on disk, which are cached, the cache's counters
    GET /health     liveness: "ok", or "draining" while shutting down (never needs the token, never waits)
    GET /ready      readiness for a load balancer: 200 while taking requests, 503 while draining (open too)
    GET /metrics    Prometheus text exposition
    GET /ui/        the web UI (difflora.webui; its page and scripts need no token, its /ui/api routes do)

Every error is JSON {"error": "..."}; its status comes from one table, STATUSES, by DiffloraError class.
Generate is checked on the event loop (4xx at once), queued (difflora.serving.scheduler: 503 past the
queue's bound, 504 past the request's deadline) and awaited; the render runs on the scheduler's thread, so a
long render never blocks /health or /metrics.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from difflora.composition.find import UnknownAdapterError
from difflora.config.serve import ServeConfig
from difflora.errors import (
    AdapterCompatibilityError,
    AdapterFormatError,
    AdapterSpecError,
    ConfigError,
    DiffloraError,
)
from difflora.serving.body import BodyLimit
from difflora.serving.engine import Engine, Result
from difflora.serving.metrics import CONTENT_TYPE
from difflora.serving.request import GenerateBody
from difflora.serving.scheduler import Job, QueueOptions, QueueTimeoutError, Scheduler, UnavailableError
from difflora.webui import install_ui, public_path
from difflora.webui.training import install_training

logger = logging.getLogger(__name__)

# DiffloraError class -> HTTP status, most specific first: the one place a status is decided.
STATUSES: tuple[tuple[type[DiffloraError], int], ...] = (
    (UnknownAdapterError, 404),
    (AdapterCompatibilityError, 409),  # made for another base: the request conflicts with this server's model
    (AdapterSpecError, 422),
    (ConfigError, 422),
    (UnavailableError, 503),  # queue full or shutting down: the error says when to retry (Retry-After)
    (QueueTimeoutError, 504),
    (AdapterFormatError, 500),  # a broken file in the server's own adapter folder: not the client's doing
    (DiffloraError, 500),
)
ROUTES = ("/generate", "/adapters", "/health", "/ready", "/metrics")
OPEN_ROUTES = ("/health", "/ready")  # load balancers probe them without credentials
POLL_SECONDS = 0.05  # how often a waiting request looks at its deadline and its client


def status_for(error: DiffloraError) -> int:
    return next(status for cls, status in STATUSES if isinstance(error, cls))


def create_app(
    engine: Engine,
    *,
    token: str | None = None,
    max_body_bytes: int = ServeConfig.max_body_kb * 1024,
    queue: QueueOptions | None = None,
    data_root: Path | None = None,
) -> FastAPI:
    """The application serving `engine`. With `token`, every route but /health and /ready needs
    `Authorization: Bearer <token>`; a body over `max_body_bytes` is refused (413) before it is read whole.
    `queue`: the queue's bound, deadlines and batching (default: QueueOptions(), no batch window). The app's
    scheduler is `app.state.scheduler`; the app's shutdown drains it. `data_root`: the one folder the web UI
    may read datasets from and train on (`app.state.data_root`; None: no training from the UI)."""
    scheduler = Scheduler(engine, queue)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(scheduler.close)

    app = FastAPI(title="difflora", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.data_root = data_root.resolve() if data_root is not None else None
    app.add_middleware(BodyLimit, limit=max_body_bytes)  # added first, so it runs under the token check
    _add_middleware(app, engine, token)
    _add_error_handlers(app)
    _add_routes(app, engine, scheduler)
    install_ui(app, engine)  # the web UI: /ui (difflora.webui)
    install_training(app, engine, app.state.data_root)
    return app


def _add_middleware(app: FastAPI, engine: Engine, token: str | None) -> None:
    Next = Callable[[Request], Awaitable[Response]]

    @app.middleware("http")
    async def authorise(request: Request, call_next: Next) -> Response:
        # the UI's page and scripts are open too: they hold no data, and the page asks for the token
        path = request.url.path
        if token and path not in OPEN_ROUTES and not public_path(path) and not _authorised(request, token):
            return JSONResponse(
                {"error": "This server needs a bearer token: send 'Authorization: Bearer <token>'."},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await call_next(request)

    @app.middleware("http")  # added last, so it runs first: it also counts the 401s
    async def count(request: Request, call_next: Next) -> Response:
        start = time.perf_counter()
        route = request.url.path if request.url.path in ROUTES else "other"  # bounded label values
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            engine.metrics.requests.inc(route=route, status=str(status))
            engine.metrics.latency.observe(time.perf_counter() - start, route=route)


def _authorised(request: Request, token: str) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DiffloraError)
    async def difflora_error(request: Request, error: DiffloraError) -> JSONResponse:
        status = status_for(error)
        log = logger.error if status >= 500 else logger.info
        log("%s %s -> %d: %s", request.method, request.url.path, status, error)
        retry = getattr(error, "retry_after", None)
        headers = {"Retry-After": str(retry)} if retry is not None else None
        return JSONResponse({"error": str(error)}, status_code=status, headers=headers)

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        message = f"Internal error ({type(error).__name__}: {error}); the server log has the traceback."
        return JSONResponse({"error": message}, status_code=500)

    @app.exception_handler(HTTPException)
    async def no_route(request: Request, error: HTTPException) -> JSONResponse:
        routes = "POST /generate, GET /adapters, GET /health, GET /ready, GET /metrics"
        message = f"{error.detail}: {request.method} {request.url.path} (routes: {routes})."
        return JSONResponse({"error": message}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        if content_type and "json" not in content_type:  # curl -d sends a form's content type
            message = (
                f"POST {request.url.path} takes a JSON body, but the request says it is {content_type!r}: "
                "send 'Content-Type: application/json' (curl: -H 'Content-Type: application/json')."
            )
            return JSONResponse({"error": message}, status_code=422)
        return JSONResponse({"error": describe_validation(error.errors())}, status_code=422)


def describe_validation(errors: Any) -> str:
    """pydantic's error list as one sentence per problem, naming the JSON field."""
    problems = []
    for item in errors:
        if item.get("type") == "json_invalid":
            reason = (item.get("ctx") or {}).get("error", "")
            return f"The request body is not valid JSON ({reason}). Send a JSON object such as " + (
                '{"prompt": "a cat", "adapters": "style:0.7"}.'
            )
        where = ".".join(str(part) for part in item.get("loc", ()) if part != "body") or "body"
        if item.get("type") == "extra_forbidden":
            fields = ", ".join(GenerateBody.model_fields)
            problems.append(f"unknown field {where!r} (fields: {fields})")
        else:
            problems.append(f"{where}: {item.get('msg', 'invalid')}")
    return "Invalid request: " + "; ".join(problems) + "."


def _add_routes(app: FastAPI, engine: Engine, scheduler: Scheduler) -> None:
    @app.post("/generate", response_model=None)
    async def generate(body: GenerateBody, request: Request) -> Response:
        # checked before it is queued (find() reads the adapter folders: off the event loop)
        ticket = await run_in_threadpool(engine.prepare, body.to_config())
        result = await _result(scheduler, scheduler.submit(ticket), request)
        if result is None:
            return Response(status_code=499)  # the client went away: nobody reads this answer
        if body.format == "png":
            image = result.images[0]
            headers = {"X-Difflora-Seed": str(image.seed)}
            return Response(image.png, media_type="image/png", headers=headers)
        return JSONResponse(_json_result(engine, result))

    @app.get("/adapters")
    def adapters() -> dict[str, Any]:
        cached = {entry.name: entry for entry in engine.cache.cached()}
        stats = engine.cache.stats()
        return {
            "available": [
                {"name": name, "file": str(path), "cached": name in cached}
                for name, path in sorted(engine.available().items())
            ],
            "cached": [{"name": e.name, "file": str(e.path), "bytes": e.nbytes} for e in cached.values()],
            "composed": [str(spec) for spec in engine.composer.adapters],
            "cache": {
                "bytes": stats.nbytes,
                "capacity_bytes": stats.capacity,
                "hits": stats.hits,
                "misses": stats.misses,
                "evictions": stats.evictions,
            },
        }

    # /health, /ready and /metrics are async: they run on the event loop, never wait for the model
    @app.get("/health")
    async def health() -> dict[str, Any]:
        identity = engine.identity
        return {
            "status": "draining" if scheduler.draining else "ok",
            "model": identity.name,
            "architecture": identity.architecture,
            "mode": engine.mode,
            "busy": engine.busy,
            "queued": scheduler.depth,
        }

    @app.get("/ready")
    async def ready() -> JSONResponse:
        # the model is loaded before the port opens, so the only not-ready state a probe can see is draining
        if scheduler.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.exposition(), media_type=CONTENT_TYPE)


async def _result(scheduler: Scheduler, job: Job, request: Request) -> Result | None:
    """`job`'s Result once rendered; None if its client went away before its turn (it leaves the queue);
    QueueTimeoutError if its deadline passed before its turn."""
    waiting = asyncio.wrap_future(job.future)
    # a blocking receive, not request.is_disconnected(): under BaseHTTPMiddleware that one's pre-cancelled
    # receive never returns the disconnect (the middleware's task group swallows it)
    gone = asyncio.ensure_future(_disconnected(request))
    watched = {waiting, gone}
    try:
        while True:
            done, _ = await asyncio.wait(watched, timeout=POLL_SECONDS)
            if waiting in done:
                return waiting.result()  # the render's own error, if it failed, is raised here
            if job.future.running():
                continue  # rendering: the answer comes with the batch
            if time.perf_counter() >= job.deadline and scheduler.withdraw(job, "timeout"):
                raise QueueTimeoutError(
                    f"The request waited {scheduler.options.request_timeout:g} s (--request-timeout) without "
                    "its turn: the server is busy; retry later."
                )
            if gone in done:
                if scheduler.withdraw(job, "disconnected"):
                    return None
                watched.discard(gone)  # it started meanwhile: render it (its answer goes nowhere)
    finally:
        gone.cancel()
        if not job.future.done():  # this task was cancelled (its connection closed): leave the queue
            scheduler.withdraw(job, "disconnected")


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone away (the body was read already: nothing else can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _json_result(engine: Engine, result: Result) -> dict[str, Any]:
    return {
        "images": [base64.b64encode(image.png).decode("ascii") for image in result.images],
        "parameters": [image.parameters for image in result.images],
        "seeds": [image.seed for image in result.images],
        "adapters": [str(spec) for spec in result.adapters],
        "model": engine.identity.name,
        "mode": engine.mode,
        "timings": result.timings,
    }
