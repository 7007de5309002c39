from fastapi import APIRouter, Depends
from sqlmodel import Session

from service.api.deps import AdminDep, SessionDep
from service.api.payloads import require_json
from service.auth import create_key, key_pools, list_keys, revoke_key
from service.errors import (
    InvalidKeyScope,
    KeyNotFound,
    PoolNotFound,
    UnsupportedMediaType,
    responses,
)
from service.models import ApiKey
from service.schemas import KeyCreate, KeyCreated, KeyPublic, RowId

router = APIRouter(prefix="/keys", tags=["keys"])


def keys_public(session: Session, rows: list[ApiKey]) -> list[KeyPublic]:
    """The keys as the API shows them, with their pools (one query for all of them)."""
    return [
        KeyPublic.model_validate({**row.model_dump(), "pools": pools})
        for row, pools in zip(rows, key_pools(session, rows), strict=True)
    ]


@router.post(
    "",
    status_code=201,
    response_model=KeyCreated,
    dependencies=[Depends(require_json)],
    responses=responses(PoolNotFound, InvalidKeyScope, UnsupportedMediaType),
)
def create_api_key(*, session: SessionDep, key: AdminDep, body: KeyCreate) -> KeyCreated:
    """Create an API key; the response shows the key itself, this once.

    An annotator key given `pools` sees only those pools' items, queries and labels.
    """
    row, secret = create_key(session, name=body.name, role=body.role, pools=body.pools or ())
    return KeyCreated(**keys_public(session, [row])[0].model_dump(), key=secret)


@router.get("", response_model=list[KeyPublic], responses=responses())
def read_api_keys(*, session: SessionDep, key: AdminDep) -> list[KeyPublic]:
    """All API keys, revoked ones included (never the keys themselves)."""
    return keys_public(session, list_keys(session))


@router.post("/{key_id}/revoke", response_model=KeyPublic, responses=responses(KeyNotFound))
def revoke_api_key(*, session: SessionDep, key: AdminDep, key_id: RowId) -> KeyPublic:
    """Revoke a key: requests with it get 401 from now on."""
    row = revoke_key(session, key_id)
    if row is None:
        raise KeyNotFound(f"no API key {key_id}")
    return keys_public(session, [row])[0]
