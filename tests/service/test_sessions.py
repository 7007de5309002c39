"""The request's session (service.api.deps.get_db) on a real database, without the test
transaction the other service tests run in: committed when the handler returns, rolled back
when it raises, never holding a connection a handler did not ask for, and never stuck
however many requests come at once for the few connections a process has."""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from anyio import to_thread
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, func, text
from sqlmodel import Session, select
from starlette.exceptions import HTTPException

from service.api import deps
from service.api.deps import SessionDep
from service.app import create_app
from service.auth import create_key
from service.db import get_engine, make_engine, migrate
from service.errors import InvalidParams, http_error_handler
from service.models import InputKind, Pool, Role, Task
from service.settings import settings
from tests.service.factories import image_bytes


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'sessions.db'}")
    migrate(engine)
    monkeypatch.setattr(deps, "get_engine", lambda: engine)
    yield engine
    engine.dispose()


@pytest.fixture
def client(engine: Engine) -> TestClient:
    app = FastAPI()
    app.add_exception_handler(HTTPException, http_error_handler)

    @app.post("/pools/{name}")
    def add_pool(session: SessionDep, name: str, fail: bool = False) -> dict[str, int]:
        pool = Pool(name=name, task=Task.regression, input_kind=InputKind.vector)
        session.add(pool)
        session.flush()
        if fail:
            raise InvalidParams("refused after the flush")
        return {"id": pool.id}  # type: ignore[dict-item]

    @app.get("/nothing")
    def no_query(session: SessionDep) -> dict[str, bool]:
        return {"in_transaction": session.in_transaction()}

    return TestClient(app)


def pools(engine: Engine) -> list[str]:
    with Session(engine) as session:
        return list(session.exec(select(Pool.name).order_by(Pool.name)))


def test_what_a_handler_stores_is_committed(client: TestClient, engine: Engine) -> None:
    assert client.post("/pools/kept").status_code == 200
    assert pools(engine) == ["kept"]


def test_a_handler_that_raises_stores_nothing(client: TestClient, engine: Engine) -> None:
    response = client.post("/pools/dropped", params={"fail": True})
    assert response.status_code == 422
    assert pools(engine) == []
    assert client.post("/pools/dropped").status_code == 200  # the name is free


def test_a_handler_without_queries_leaves_every_connection_in_the_pool(
    client: TestClient, engine: Engine
) -> None:
    assert client.get("/nothing").json() == {"in_transaction": False}
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    client.post("/pools/a")
    client.post("/pools/b", params={"fail": True})
    assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    with Session(engine) as session:
        assert session.exec(select(func.count()).select_from(Pool)).one() == 1


@pytest.mark.anyio
async def test_many_requests_at_once_for_few_connections_all_get_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two connections, two worker threads, twenty requests at once. A request holds its
    connection from its handler through the validation of its answer to its commit, each a
    trip through the thread pool: were the threads taken by handlers waiting for a
    connection, neither would ever move (until the pool's timeout: an error)."""
    engine = create_engine(
        f"sqlite:///{tmp_path / 'two.db'}",
        pool_size=2,
        max_overflow=0,
        pool_timeout=5,
        connect_args={"check_same_thread": False},
    )
    monkeypatch.setattr(deps, "get_engine", lambda: engine)
    monkeypatch.setattr(settings, "db_pool_size", 2)
    to_thread.current_default_thread_limiter().total_tokens = 2
    app = FastAPI()

    @app.get("/one")
    def one(session: SessionDep) -> int:
        return session.execute(text("SELECT 1")).scalar_one()

    statuses: list[int] = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

        async def get() -> None:
            statuses.append((await client.get("/one")).status_code)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as requests:
                for _ in range(20):
                    requests.start_soon(get)
    engine.dispose()
    assert statuses == [200] * 20


@pytest.mark.timeout(60)  # were the look-up to wait for the place its request holds: forever
def test_a_handler_holding_a_session_looks_up_a_key_not_yet_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key look-up takes no session place: its request may hold one already (admin
    routes take their session first), and all places may be held by such requests."""
    monkeypatch.setattr(settings, "database_url", f"sqlite:///{tmp_path / 'keys.db'}")
    monkeypatch.setattr(settings, "db_pool_size", 1)
    migrate()
    with Session(get_engine()) as session:
        _, key = create_key(session, name="root", role=Role.admin)
        session.commit()
    client = TestClient(create_app(startup=False))
    response = client.get("/pools", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text


@pytest.mark.anyio
async def test_a_slow_upload_holds_no_session_place_while_its_body_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One session place, an upload whose body is still on its way: the other requests of
    the process are served meanwhile (the body is read before the session is taken)."""
    monkeypatch.setattr(settings, "database_url", f"sqlite:///{tmp_path / 'slow.db'}")
    monkeypatch.setattr(settings, "data_dir", tmp_path)
    monkeypatch.setattr(settings, "db_pool_size", 1)
    migrate()
    with Session(get_engine()) as session:
        pool = Pool(name="digits", task=Task.classification, classes=["0"], input_kind="image")
        session.add(pool)
        _, key = create_key(session, name="root", role=Role.admin)
        session.commit()
        pool_id = pool.id
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    rest_may_come = anyio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield head
        await rest_may_come.wait()
        yield image_bytes() + f"\r\n--{boundary}--\r\n".encode()

    transport = httpx.ASGITransport(app=create_app(startup=False))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", headers={"Authorization": f"Bearer {key}"}
    ) as client:
        uploaded: list[httpx.Response] = []

        async def upload() -> None:
            uploaded.append(
                await client.post(
                    f"/pools/{pool_id}/items",
                    content=slow_body(),
                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
                )
            )

        with anyio.fail_after(30):
            async with anyio.create_task_group() as requests:
                requests.start_soon(upload)
                await anyio.sleep(0.2)  # the upload is in, its body half sent
                with anyio.fail_after(5):
                    assert (await client.get("/pools")).status_code == 200
                rest_may_come.set()
    assert uploaded[0].status_code == 201, uploaded[0].text
