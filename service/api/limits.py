"""Refusing request bodies over `max_body_bytes`, declared or streamed, before they are read."""

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge


class BodyLimit:
    """Pure ASGI middleware: 413 from Content-Length at once, or as soon as a streamed
    (chunked) body passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, int(declared))
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # An HTTPException: FastAPI passes it through its body parsing untouched.
                    raise PayloadTooLarge(self._detail(seen))
            return message

        await self.app(scope, counted, send)

    def _detail(self, size: int) -> str:
        return f"request body of {size} bytes or more exceeds the limit of {self.max_bytes} bytes"

    async def _refuse(self, send: Send, size: int) -> None:
        body = json.dumps({"error": "PayloadTooLarge", "detail": self._detail(size)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
