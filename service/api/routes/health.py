from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlmodel import Session

from service.api.deps import DatabaseDep
from service.schemas import Health, Readiness
from service.settings import settings

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up (no database access: cheap enough to poll often)."""
    return Health()


def _broker_check(url: str) -> str:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as e:
        return f"unreachable: {e}"
    return "ok"


def _select_one(session: Session) -> None:
    session.execute(text("SELECT 1"))


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "What is down."}},
)
async def readyz(*, database: DatabaseDep) -> Readiness | JSONResponse:
    """The database answers and, when one is configured, so does the task broker."""
    checks: dict[str, str] = {}
    try:
        # Out of turn: a busy process is still ready, and must not look down while its
        # requests hold every session place.
        await database.run(_select_one, wait_turn=False)
        checks["database"] = "ok"
    except Exception as e:
        checks["database"] = f"unreachable: {type(e).__name__}"
    checks["broker"] = (
        "not configured (embedded runner)"
        if settings.broker_url is None
        else await run_in_threadpool(_broker_check, settings.broker_url)
    )
    down = [name for name, state in checks.items() if state.startswith("unreachable")]
    if down:
        body = Readiness(status="unavailable", checks=checks)
        return JSONResponse(body.model_dump(), status_code=503)
    return Readiness(status="ready", checks=checks)
