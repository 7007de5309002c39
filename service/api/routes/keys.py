from fastapi import APIRouter

from service.api.deps import AdminDep, SessionDep
from service.auth import create_key, list_keys, revoke_key
from service.errors import KeyNotFound, responses
from service.models import ApiKey
from service.schemas import KeyCreate, KeyCreated, KeyPublic, RowId

router = APIRouter(prefix="/keys", tags=["keys"])


def key_public(row: ApiKey) -> KeyPublic:
    return KeyPublic.model_validate(row.model_dump())


@router.post("", status_code=201, response_model=KeyCreated, responses=responses())
def create_api_key(*, session: SessionDep, key: AdminDep, body: KeyCreate) -> KeyCreated:
    """Create an API key; the response shows the key itself, this once."""
    row, secret = create_key(session, name=body.name, role=body.role)
    return KeyCreated(**key_public(row).model_dump(), key=secret)


@router.get("", response_model=list[KeyPublic], responses=responses())
def read_api_keys(*, session: SessionDep, key: AdminDep) -> list[KeyPublic]:
    """All API keys, revoked ones included (never the keys themselves)."""
    return [key_public(row) for row in list_keys(session)]


@router.post("/{key_id}/revoke", response_model=KeyPublic, responses=responses(KeyNotFound))
def revoke_api_key(*, session: SessionDep, key: AdminDep, key_id: RowId) -> KeyPublic:
    """Revoke a key: requests with it get 401 from now on."""
    row = revoke_key(session, key_id)
    if row is None:
        raise KeyNotFound(f"no API key {key_id}")
    return key_public(row)
