"""The bound on request bodies of `difflora serve` (`--max-body-kb`): a longer body is answered 413 before it
is read whole.

A pure ASGI middleware, not a route reading `request.stream()`: FastAPI reads and parses the whole body
before a route (or any dependency) runs, which is where a 50 MB body took the server from 0.7 to 2.3 GB.
The middleware sits under the bearer-token check and above FastAPI. It refuses a declared Content-Length
over the limit without reading a byte, and counts the bytes of a body that declares none (chunked
transfer) as they arrive, stopping at the first chunk past the limit; a body within the limit is handed on
to the application as one message. So the server holds at most `limit` bytes of any body (plus the chunk
that crossed it), whatever the client sends.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from difflora.config.limits import MAX_PROMPT_CHARS

# a Content-Length of more digits is over any limit (and int() of 5000 digits raises)
DIGITS_OF_ANY_REAL_LENGTH = 18


class BodyLimit:
    """ASGI middleware answering 413 (JSON {"error": ...}) for an HTTP request body over `limit` bytes."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = content_length(scope)
        if declared is not None and declared > self.limit:
            await self._refuse(scope, receive, send, f"it says it is {declared} bytes")
            return
        body = await read_at_most(receive, self.limit)
        if body is None:
            await self._refuse(scope, receive, send, "it went past that")
            return
        await self.app(scope, replay(body, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, why: str) -> None:
        message = (
            f"The request body is over this server's limit of {self.limit} bytes (--max-body-kb; {why}): "
            f"a request is a small JSON object, its prompts at most {MAX_PROMPT_CHARS} characters."
        )
        # Connection: close, or the server would read the rest of the body to reach the next request
        response = JSONResponse({"error": message}, status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)


def content_length(scope: Scope) -> int | None:
    """The declared Content-Length (None when absent or not a number: the HTTP server refuses those)."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length" and value.strip().isdigit():
            digits = value.strip()
            return 10**DIGITS_OF_ANY_REAL_LENGTH if len(digits) > DIGITS_OF_ANY_REAL_LENGTH else int(digits)
    return None


async def read_at_most(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes `limit` bytes (the rest is never received)."""
    chunks: list[bytes] = []
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] != "http.request":  # the client went away: the app sees it on its next receive
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives `body` as one message, then whatever the connection says (a disconnect)."""
    given = False

    async def receive_body() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_body
