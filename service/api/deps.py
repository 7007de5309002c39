"""Request dependencies: the session of a sync handler (one transaction) or the Database of
an async one, the label writer, the blob store, the caller."""

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Annotated, Any, TypeVar

from anyio import CapacityLimiter
from anyio.lowlevel import RunVar
from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlmodel import Session

from service.api.group_commit import GroupCommit
from service.auth import Caller, live_keys
from service.blobs import BlobStore, FileBlobStore
from service.db import get_engine
from service.errors import Forbidden, NotAuthenticated, ServiceError
from service.label_writer import LabelStore
from service.labels import LabelRequest
from service.models import Role
from service.page_cache import PageCache
from service.schemas import LabelsCreated
from service.settings import settings

Result = TypeVar("Result")


async def get_db() -> AsyncIterator[Session]:
    """One transaction per request: committed when the handler returns, else rolled back.

    Async, yet it never blocks the event loop: a new session opens no connection, and the
    commit (or rollback) runs on a worker thread. A sync dependency would cost every request
    two trips through the thread pool, to open the session and to close it.
    """
    async with _sessions():
        session = Session(get_engine(), expire_on_commit=False)
        try:
            yield session
        except BaseException:
            await run_in_threadpool(session.close)  # rolls back
            raise
        if session.in_transaction():
            await run_in_threadpool(_commit_and_close, session)
        else:
            session.close()  # it never held a connection


def _commit_and_close(session: Session) -> None:
    with session:
        session.commit()


class Database:
    """For async handlers that need the database only sometimes (a page or a key not in
    memory): `run` takes a session only then, unlike SessionDep, which every request of a
    handler holds from start to end."""

    def __init__(self, engine: Callable[[], Engine] = lambda: get_engine()) -> None:
        self.engine = engine

    async def run(self, work: Callable[..., Result], *args: Any, wait_turn: bool = True) -> Result:
        """`work(session, *args)` on a worker thread, in a transaction committed when it
        returns, else rolled back; in turn with SessionDep's sessions unless `wait_turn` is
        False (for work its request may run while holding a session already)."""
        if not wait_turn:
            return await run_in_threadpool(self._in_transaction, work, *args)
        async with _sessions():
            return await run_in_threadpool(self._in_transaction, work, *args)

    def _in_transaction(self, work: Callable[..., Result], *args: Any) -> Result:
        with Session(self.engine(), expire_on_commit=False) as session:
            result = work(session, *args)
            session.commit()
            return result


async def get_database() -> Database:
    return _database


_database = Database()


_session_limiter: RunVar[CapacityLimiter] = RunVar("sessions")


def _sessions() -> CapacityLimiter:
    """At most `db_pool_size` requests of this process hold a session at once; the others
    wait here, in order, before they take a connection.

    Without it a request thread may wait in SQLAlchemy's pool, where other threads can pass
    it over again and again (seconds, under load), while holding one of the thread pool's
    places that the requests with a connection need to finish and give theirs back.
    """
    try:
        return _session_limiter.get()
    except LookupError:
        limiter = CapacityLimiter(settings.db_pool_size)
        _session_limiter.set(limiter)
        return limiter


LabelWriter = GroupCommit[LabelRequest, LabelsCreated]


def label_writer(store: LabelStore, pages: PageCache) -> LabelWriter:
    """Concurrent POST /labels share round trips, run on the event loop: no worker thread,
    whose every round trip would wait for the GIL behind the busy loop. A request's new
    labels show on this process's GET /queries pages as soon as it is answered.
    """

    async def write(requests: Sequence[LabelRequest]) -> list[LabelsCreated | ServiceError]:
        stored = await store.store(requests)
        pages.changed(stored.rounds)
        return stored.answers

    # A batch holds at most this many labels (a request with more is a batch of its own).
    return LabelWriter(write, most=10_000, size=lambda request: len(request.inputs))


async def get_label_writer(request: Request) -> LabelWriter:
    """This process's label writer, made when the app starts."""
    return request.app.state.label_writer  # type: ignore[no-any-return]


def get_blobs() -> BlobStore:
    return FileBlobStore(settings.blob_dir)


# scope="function": commit before the response is sent, so a failed commit is an error
# (a 503 when the connection was lost) rather than a success the client was already told about.
SessionDep = Annotated[Session, Depends(get_db, scope="function")]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
LabelWriterDep = Annotated[LabelWriter, Depends(get_label_writer)]
DatabaseDep = Annotated[Database, Depends(get_database)]

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer ally_...`")


async def current_key(
    database: DatabaseDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The caller's API key; 401 without a valid one.

    A key `live_keys` trusts needs neither the database nor a trip through the thread
    pool (on PostgreSQL, while the change feed answers, a key found live stays trusted until
    it is revoked or changed); any other is looked up on a worker thread.
    """
    if credentials is None:
        raise NotAuthenticated("send an API key as 'Authorization: Bearer <key>'")
    # Out of turn: the request may hold a session place already (SessionDep), and the
    # look-up is short and rare.
    key = live_keys.remembered(credentials.credentials) or await database.run(
        live_keys.find, credentials.credentials, wait_turn=False
    )
    if key is None:
        raise NotAuthenticated("unknown or revoked API key")
    return key


# Async because it does no I/O: FastAPI runs a sync dependency on a worker thread.
async def require_admin(key: Annotated[Caller, Depends(current_key)]) -> Caller:
    if key.role != Role.admin:
        raise Forbidden(f"this needs an admin key; key {key.name!r} is an {key.role} key")
    return key


AdminDep = Annotated[Caller, Depends(require_admin)]
# Any live key: admins may do everything annotators do.
AnnotatorDep = Annotated[Caller, Depends(current_key)]
