"""Request-scoped dependencies: the session (one transaction), the blob store, the caller."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from service.auth import live_keys
from service.blobs import BlobStore, FileBlobStore
from service.db import get_engine
from service.errors import Forbidden, NotAuthenticated
from service.models import ApiKey, Role
from service.settings import settings


def get_db() -> Iterator[Session]:
    """One transaction per request: committed when the handler returns, else rolled back."""
    with Session(get_engine(), expire_on_commit=False) as session:
        yield session
        session.commit()


def get_blobs() -> BlobStore:
    return FileBlobStore(settings.blob_dir)


# scope="function": commit before the response is sent, so a failed commit is an error
# (a 503 when the connection was lost) rather than a success the client was already told about.
SessionDep = Annotated[Session, Depends(get_db, scope="function")]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer ally_...`")


def current_key(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> ApiKey:
    """The caller's API key; 401 without a valid one."""
    if credentials is None:
        raise NotAuthenticated("send an API key as 'Authorization: Bearer <key>'")
    key = live_keys.find(session, credentials.credentials)
    if key is None:
        raise NotAuthenticated("unknown or revoked API key")
    return key


def require_admin(key: Annotated[ApiKey, Depends(current_key)]) -> ApiKey:
    if key.role != Role.admin:
        raise Forbidden(f"this needs an admin key; key {key.name!r} is an {key.role} key")
    return key


def require_annotator(key: Annotated[ApiKey, Depends(current_key)]) -> ApiKey:
    """Annotators and admins (admins may do everything annotators do)."""
    return key


AdminDep = Annotated[ApiKey, Depends(require_admin)]
AnnotatorDep = Annotated[ApiKey, Depends(require_annotator)]
