"""The FastAPI application: `uvicorn service.app:app` (or `ally serve`)."""

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException

from service.api.deps import label_writer
from service.api.limits import BodyLimit
from service.api.routes import curves, health, items, keys, labels, pools, queries, rounds
from service.auth import live_keys
from service.changes import ChangeFeed
from service.db import is_postgres, migrate
from service.errors import database_error_handler, http_error_handler, validation_error_handler
from service.label_writer import label_store
from service.page_cache import PageCache
from service.schemas import ImportRequest, VectorItemsCreate
from service.settings import settings

DESCRIPTION = """
Pool-based batch active learning with **ALLY** (Active Learning via Lagrangian dualitY).

Admins create a pool, add items, and start rounds; annotators fetch each round's queries
and post labels. Authenticate with `Authorization: Bearer <key>` (keys come from
`ally keys create`). Errors are `{"error": "<code>", "detail": "..."}`.
"""


@asynccontextmanager
async def _startup(app: FastAPI) -> AsyncIterator[None]:
    migrate()
    store = label_store(settings.database)
    app.state.label_writer = label_writer(store, app.state.pages)
    # PostgreSQL tells which rounds change (so GET /queries pages can be kept) and which
    # keys are revoked (refused at once, not after key_cache_seconds): changes.py.
    feed = None
    if is_postgres(settings.database):
        changes = ChangeFeed(settings.database, app.state.pages, live_keys)
        feed = asyncio.create_task(changes.run())
    # What is made by now (modules, the app, its routes and schemas) lives as long as the
    # process: kept out of the collector's full passes, each costs ~3 ms instead of ~100 ms
    # (over 150,000 objects), which under load came every few seconds in every process.
    gc.collect()  # startup's garbage, not to be kept for good
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()  # an app started again in this process (tests) frees what it left
        if feed is not None:
            feed.cancel()
            with suppress(asyncio.CancelledError):
                await feed
        await store.close()


# Bodies read by content type (service/api/payloads.py): the routes refer to these schemas
# in openapi_extra, so they must be in the spec's components although no parameter uses them.
EXTRA_SCHEMAS: tuple[type[BaseModel], ...] = (VectorItemsCreate, ImportRequest)


def _openapi_with_extra_schemas(app: FastAPI) -> Callable[[], dict[str, Any]]:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = generate()
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in EXTRA_SCHEMAS:
                schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, definition in schema.pop("$defs", {}).items():
                    components.setdefault(name, definition)
                components[model.__name__] = schema
        return app.openapi_schema  # type: ignore[return-value]

    return openapi


def create_app(*, startup: bool = True) -> FastAPI:
    """The app; `startup`: as it starts, migrate the database, open the label writer's
    connections and listen for changed rounds."""
    app = FastAPI(
        title="ALLY labeling service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=_startup if startup else None,
    )
    app.state.pages = PageCache()
    app.add_exception_handler(HTTPException, http_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(DBAPIError, database_error_handler)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    # Routes are matched in order: the annotators' hot routes first.
    for module in (queries, labels, pools, items, rounds, curves, keys, health):
        app.include_router(module.router)
    app.openapi = _openapi_with_extra_schemas(app)  # type: ignore[method-assign]
    return app


app = create_app()
