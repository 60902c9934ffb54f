"""Early limits: a pure ASGI middleware that decides on a request's body before any work is queued.

Why not BentoML's own limit: BentoML 1.4 stacks its middlewares as metrics, tracing, access log,
TimeoutMiddleware, MaxConcurrencyMiddleware, then the service's `add_asgi_middleware` ones, then the
app (_bentoml_impl/server/app.py `middlewares`). A service middleware therefore always runs INSIDE
the concurrency limit, and the body is read inside it too: 64 sockets trickling 1 byte every 2 s
held every slot and everyone else got 429 for 30 s. So the service leaves `traffic.max_concurrency`
unset and this middleware applies the same limit (serve.max_concurrency) itself, but only once the
body has arrived:

1. Content-Length over serve.max_body_mb -> 413 at once, before a byte of the body is read, with
   `Connection: close`. Starting the answer before any receive() also means uvicorn never sends
   `100 Continue` to a client that asked with `Expect: 100-continue`. A client that sends its body
   anyway (no Expect) has it drained for a short, bounded while so that it can read the 413.
2. The body is read in full (chunked bodies too, 413 past the limit) within serve.body_timeout
   seconds, else 408 + close. A slow sender costs one idle coroutine, not a processing slot.
3. Bodies held at once, all requests together, stay under serve.max_buffered_mb, else 503.
4. Only then the request takes one of serve.max_concurrency processing slots (429 when none is free).
"""
from __future__ import annotations

import asyncio
import json
import logging

logger = logging.getLogger("bentoml.edgepipe")

BYPASS_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
DRAIN_BYTES = 32 * 1024 * 1024   # at most this much of a refused body is read and dropped ...
DRAIN_SECONDS = 2.0              # ... for at most this long, then the connection is closed


class Refused(Exception):
    """A request refused by the limits: status, message, and whether the connection must close."""

    def __init__(self, status: int, message: str, close: bool = True, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.close, self.headers = status, message, close, headers or {}


class ClientGone(Exception):
    pass


def json_answer(status: int, message: str, close: bool = False, headers: dict | None = None):
    """(start, body) ASGI messages of the service's error JSON {"error", "status"}."""
    body = json.dumps({"error": message, "status": status}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), str(v).encode()) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    return {"type": "http.response.start", "status": status, "headers": raw}, body


class EarlyLimits:
    def __init__(self, app, max_body_bytes: int, body_timeout: float, max_concurrency: int,
                 max_buffered_bytes: int, on_refused=None):
        self.app = app
        self.max_body = int(max_body_bytes)
        self.body_timeout = float(body_timeout)
        self.max_concurrency = int(max_concurrency)
        self.max_buffered = int(max_buffered_bytes)
        self.on_refused = on_refused     # callback(status) for the rejected-requests metric
        self.in_flight = 0               # requests past the body read (single event loop: plain ints)
        self.buffered = 0                # bytes of bodies held right now

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS")
                or scope["path"] in BYPASS_PATHS):
            return await self.app(scope, receive, send)
        held = [0]   # bytes of this request counted in self.buffered, released whatever happens
        try:
            try:
                length = self._content_length(scope)
                if length is not None and length > self.max_body:
                    return await self._refuse_unread(scope, receive, send, length)
                body = await self._read_body(receive, held)
                if self.in_flight >= self.max_concurrency:
                    raise Refused(429, f"the server is busy: {self.max_concurrency} requests are being "
                                       f"processed (serve.max_concurrency); retry shortly", close=False,
                                  headers={"retry-after": "1"})
            except Refused as r:
                return await self._answer(send, r)
            except ClientGone:
                # Answer anyway (uvicorn drops it): BentoML's TimeoutMiddleware around us waits for a
                # first send() or its full timeout, and uvicorn's shutdown waited for those requests.
                start, msg = json_answer(400, "the client closed the connection before the body arrived", True)
                await send(start)
                return await send({"type": "http.response.body", "body": msg, "more_body": False})
            self.in_flight += 1
            try:
                await self.app(scope, _replay(body, receive), send)
            finally:
                self.in_flight -= 1
        finally:
            self.buffered -= held[0]

    # ------------------------------------------------------------------------------------ pieces
    @staticmethod
    def _content_length(scope):
        values = [v for k, v in scope.get("headers", []) if k == b"content-length"]
        if not values:
            return None
        if len(set(values)) > 1 or not values[0].isdigit() or len(values[0]) > 18:
            raise Refused(400, "invalid Content-Length header")
        return int(values[0])

    async def _read_body(self, receive, held: list) -> bytes:
        """The whole body within body_timeout (408), at most max_body bytes (413), counted in `buffered`."""
        try:
            return await asyncio.wait_for(self._collect(receive, held), self.body_timeout)
        except asyncio.TimeoutError:
            raise Refused(408, f"the request body did not arrive within serve.body_timeout = "
                               f"{self.body_timeout:g} s; send the file in one go (on a slow link, resize "
                               f"it first)") from None

    async def _collect(self, receive, held: list) -> bytes:
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                raise ClientGone()
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            seen += len(chunk)
            if seen > self.max_body:
                raise Refused(413, self._too_large_message())
            if self.buffered + len(chunk) > self.max_buffered:
                raise Refused(503, f"the server is receiving too many uploads at once "
                                   f"(serve.max_buffered_mb = {self.max_buffered / 1e6:g}); retry shortly",
                              headers={"retry-after": "1"})
            self.buffered += len(chunk)
            held[0] += len(chunk)
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large_message(self) -> str:
        return (f"the request body is larger than serve.max_body_mb = {self.max_body / 1e6:g} MB; send a "
                f"smaller (re-encoded or resized) image")

    async def _refuse_unread(self, scope, receive, send, length: int) -> None:
        """413 before reading: the status goes out first, then a bounded drain, then the close."""
        if self.on_refused:
            self.on_refused(413)
        start, body = json_answer(413, self._too_large_message(), close=True)
        await send(start)
        await send({"type": "http.response.body", "body": body, "more_body": True})
        expects = any(k == b"expect" for k, _ in scope.get("headers", []))
        if not expects:   # the client is sending the body anyway; reading some lets it see the 413
            try:
                await asyncio.wait_for(_drain(receive, min(length, DRAIN_BYTES)), DRAIN_SECONDS)
            except asyncio.TimeoutError:
                pass
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _answer(self, send, r: Refused) -> None:
        if self.on_refused:
            self.on_refused(r.status)
        if r.status >= 500 or r.status in (408, 413):
            logger.info("edgepipe: refused a request with %d: %s", r.status, r.message)
        start, body = json_answer(r.status, r.message, close=r.close, headers=r.headers)
        await send(start)
        await send({"type": "http.response.body", "body": body, "more_body": False})


async def _drain(receive, limit: int) -> None:
    seen = 0
    while seen < limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _replay(body: bytes, receive):
    """A receive() that gives the app the buffered body once, then the real channel (disconnects)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
