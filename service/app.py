"""The FastAPI application: `uvicorn service.app:app` (or `ally serve`)."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from service.api.limits import BodyLimit
from service.api.routes import curves, health, items, keys, labels, pools, queries, rounds
from service.db import migrate
from service.errors import http_error_handler, validation_error_handler
from service.settings import settings

DESCRIPTION = """
Pool-based batch active learning with **ALLY** (Active Learning via Lagrangian dualitY).

Admins create a pool, add items, and start rounds; annotators fetch each round's queries
and post labels. Authenticate with `Authorization: Bearer <key>` (keys come from
`ally keys create`). Errors are `{"error": "<code>", "detail": "..."}`.
"""


@asynccontextmanager
async def _migrate_on_startup(app: FastAPI) -> AsyncIterator[None]:
    migrate()
    yield


def create_app(*, migrate_on_startup: bool = True) -> FastAPI:
    app = FastAPI(
        title="ALLY labeling service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=_migrate_on_startup if migrate_on_startup else None,
    )
    app.add_exception_handler(HTTPException, http_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    for module in (pools, items, rounds, queries, labels, curves, keys, health):
        app.include_router(module.router)
    return app


app = create_app()
