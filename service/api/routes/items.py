import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from service import archives, datasets
from service.api.deps import AdminDep, AnnotatorDep, BlobsDep, SessionDep
from service.api.payloads import ImportPayload, ItemsPayload, import_payload, items_payload
from service.blobs import BlobStore, blob_key
from service.crud import check_shapes, get_item, get_pool
from service.errors import (
    BadInput,
    ConcurrentUpload,
    DatasetMismatch,
    ImageTooLarge,
    InvalidArchive,
    InvalidImage,
    ItemNotFound,
    NoImage,
    PayloadTooLarge,
    PoolNotFound,
    ShapeMismatch,
    UnsupportedMediaType,
    WrongInputKind,
    responses,
)
from service.images import MEDIA_TYPES, inspect_image, load_npy, npy_bytes, png_from_array
from service.importing import import_dataset, read_folder
from service.models import BlobFormat, InputKind, Item, Pool
from service.schemas import MAX_INT, Duplicate, ImportSummary, ItemPublic, ItemsCreated, RowId
from service.settings import settings

router = APIRouter(tags=["items"])


def image_url(request: Request, item: Item) -> str | None:
    if item.kind != InputKind.image:
        return None
    return f"{request.base_url}items/{item.id}/image"


def item_public(request: Request, item: Item, vector: list[float] | None = None) -> ItemPublic:
    return ItemPublic(**item.model_dump(), image_url=image_url(request, item), vector=vector)


_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "PNG or JPEG images.",
                        },
                        "split": {"type": "string", "enum": ["pool", "holdout"]},
                        "meta": {"type": "string", "description": "A JSON object for each item."},
                    },
                }
            },
            "application/json": {"schema": {"$ref": "#/components/schemas/VectorItemsCreate"}},
        },
    }
}

_IMPORT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ImportRequest"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["archive"],
                    "properties": {
                        "archive": {
                            "type": "string",
                            "format": "binary",
                            "description": "A zip or tar(.gz) of IDX files, or of an image "
                            "folder with one sub-folder per class (optionally under train/ "
                            "and test/; test becomes the holdout split).",
                        },
                        "with_labels": {"type": "boolean", "default": False},
                        "holdout_fraction": {
                            "type": "number",
                            "default": 0,
                            "minimum": 0,
                            "exclusiveMaximum": 1,
                        },
                        "seed": {"type": "integer", "default": 0, "minimum": 0, "maximum": MAX_INT},
                    },
                }
            },
        },
    }
}


def _add_images(
    request: Request, session: Session, blobs: BlobStore, pool: Pool, payload: ItemsPayload
) -> ItemsCreated:
    # Every upload is checked before anything is stored.
    infos = [
        inspect_image(u.data, u.name, settings.max_image_bytes, settings.max_image_pixels)
        for u in payload.uploads
    ]
    check_shapes(
        session, pool, ((u.name, i.shape) for u, i in zip(payload.uploads, infos, strict=True))
    )
    keys = [blob_key(u.data) for u in payload.uploads]
    return _store(
        request,
        session,
        pool,
        keys,
        names=[u.name for u in payload.uploads],
        make=lambda i: Item(
            pool_id=pool.id,  # type: ignore[arg-type]
            sha256=blobs.put(payload.uploads[i].data),
            format=infos[i].format,
            kind=InputKind.image,
            shape=infos[i].shape,
            dtype=infos[i].dtype,
            split=payload.split,
            meta={**payload.meta, "filename": payload.uploads[i].name},
        ),
    )


def _add_vectors(
    request: Request, session: Session, blobs: BlobStore, pool: Pool, payload: ItemsPayload
) -> ItemsCreated:
    body = payload.vectors
    assert body is not None
    vectors = np.asarray(body.vectors, dtype=np.float64)
    if np.abs(vectors).max() > np.finfo(np.float32).max:
        raise BadInput("vector values must fit in float32 (|x| < 3.4e38)")
    vectors = vectors.astype(np.float32)
    check_shapes(session, pool, [("the vectors", [vectors.shape[1]])])
    data = [npy_bytes(v) for v in vectors]
    return _store(
        request,
        session,
        pool,
        [blob_key(d) for d in data],
        names=[f"vectors[{i}]" for i in range(len(data))],
        make=lambda i: Item(
            pool_id=pool.id,  # type: ignore[arg-type]
            sha256=blobs.put(data[i]),
            format=BlobFormat.npy,
            kind=InputKind.vector,
            shape=[vectors.shape[1]],
            dtype="float32",
            split=body.split,
            meta=body.meta[i] if body.meta else {},
        ),
    )


def _store(
    request: Request,
    session: Session,
    pool: Pool,
    keys: list[str],
    *,
    names: list[str],
    make: Callable[[int], Item],
) -> ItemsCreated:
    """Insert an item for each new key; report the others as duplicates of existing items."""
    existing: dict[str, int] = dict(
        session.exec(
            select(Item.sha256, Item.id).where(Item.pool_id == pool.id, col(Item.sha256).in_(keys))
        ).all()
    )
    created: list[Item] = []
    first_index: dict[str, int] = {}
    repeats: list[tuple[int, str]] = []
    for i, key in enumerate(keys):
        if key in existing or key in first_index:
            repeats.append((i, key))
            continue
        first_index[key] = len(created)
        created.append(make(i))
    session.add_all(created)
    try:
        session.flush()
    except IntegrityError:
        raise ConcurrentUpload(
            "another request added some of these items at the same moment; retry"
        ) from None
    ids = {**existing, **{key: created[j].id for key, j in first_index.items()}}
    return ItemsCreated(
        created=[item_public(request, item) for item in created],
        duplicates=[Duplicate(index=i, name=names[i], item_id=ids[key]) for i, key in repeats],
    )


@router.post(
    "/pools/{pool_id}/items",
    status_code=201,
    response_model=ItemsCreated,
    openapi_extra=_UPLOAD_BODY,
    responses=responses(
        PoolNotFound,
        BadInput,
        InvalidImage,
        WrongInputKind,
        ImageTooLarge,
        UnsupportedMediaType,
        ShapeMismatch,
        ConcurrentUpload,
    ),
)
def create_items(
    *,
    request: Request,
    # In this order: the key is checked before the body is read, and the body is read (however
    # slowly it comes) before the session takes one of the process's places.
    key: AdminDep,
    payload: Annotated[ItemsPayload, Depends(items_payload)],
    session: SessionDep,
    blobs: BlobsDep,
    pool_id: RowId,
) -> ItemsCreated:
    """Add items: PNG/JPEG files as multipart (field `files`), or vectors as JSON.

    Items whose bytes the pool already holds are not added again; they are listed under
    `duplicates` with the existing item's id.
    """
    pool = get_pool(session, pool_id)
    if payload.vectors is not None:
        if pool.input_kind != InputKind.vector:
            raise WrongInputKind(f"pool {pool_id} holds images; upload PNG or JPEG files")
        return _add_vectors(request, session, blobs, pool, payload)
    if pool.input_kind != InputKind.image:
        raise WrongInputKind(f"pool {pool_id} holds vectors; send them as JSON")
    return _add_images(request, session, blobs, pool, payload)


@router.post(
    "/pools/{pool_id}/import",
    status_code=201,
    response_model=ImportSummary,
    openapi_extra=_IMPORT_BODY,
    responses=responses(
        PoolNotFound,
        InvalidArchive,
        DatasetMismatch,
        ShapeMismatch,
        PayloadTooLarge,
        UnsupportedMediaType,
    ),
)
def import_items(
    *,
    # In this order, as create_items' parameters.
    key: AdminDep,
    payload: Annotated[ImportPayload, Depends(import_payload)],
    session: SessionDep,
    blobs: BlobsDep,
    pool_id: RowId,
) -> ImportSummary:
    """Import a whole dataset: a packaged one by name (JSON), or an uploaded archive.

    Archives hold IDX files (MNIST layout) or an image folder with one sub-folder per class;
    a `test` split becomes the holdout. Ground truth is stored only for the holdout (the
    evaluation set), and for the pool split as seed labels only with `with_labels`.
    """
    pool = get_pool(session, pool_id)
    if payload.dataset is not None:
        source = payload.dataset
        splits = datasets.packaged(source)
    else:
        assert payload.archive is not None
        source = Path(payload.archive_name).name
        with tempfile.TemporaryDirectory(prefix="ally-import-") as tmp:
            archives.extract(
                payload.archive,
                Path(tmp),
                max_bytes=settings.max_archive_unpacked_bytes,
                max_members=settings.max_archive_members,
            )
            splits = read_folder(Path(tmp), settings.max_image_pixels)
    result = import_dataset(
        session,
        blobs,
        pool,
        splits,
        source=source,
        with_labels=payload.with_labels,
        holdout_fraction=payload.holdout_fraction,
        seed=payload.seed,
    )
    return ImportSummary(
        pool_id=pool_id,
        source=source,
        added=result.added,
        duplicates=result.duplicates,
        labels=result.labels,
    )


@router.get(
    "/items/{item_id}",
    response_model=ItemPublic,
    responses=responses(ItemNotFound),
)
def read_item(
    *, request: Request, session: SessionDep, key: AnnotatorDep, blobs: BlobsDep, item_id: RowId
) -> ItemPublic:
    """One item: its hash, shape, split and metadata, an image URL or the vector's values."""
    item = get_item(session, item_id, seen_by=key)
    vector = None
    if item.kind == InputKind.vector:
        vector = load_npy(blobs.get(item.sha256)).astype(float).tolist()
    return item_public(request, item, vector)


@router.get(
    "/items/{item_id}/image",
    response_class=Response,
    responses={
        **responses(ItemNotFound, NoImage),
        200: {
            "content": {"image/png": {}, "image/jpeg": {}},
            "description": "The uploaded bytes, or a PNG rendering of an array image.",
        },
    },
)
def read_item_image(
    *, session: SessionDep, key: AnnotatorDep, blobs: BlobsDep, item_id: RowId
) -> Response:
    """The item's image: the uploaded PNG/JPEG bytes, or a PNG rendering of an array image."""
    item = get_item(session, item_id, seen_by=key)
    if item.kind != InputKind.image:
        raise NoImage(f"item {item_id} is a vector; it has no image")
    data = blobs.get(item.sha256)
    if item.format == BlobFormat.npy:
        data, media_type = png_from_array(load_npy(data)), "image/png"
    else:
        media_type = MEDIA_TYPES[BlobFormat(item.format)]
    # Content-addressed: the bytes behind this URL never change.
    headers = {"Cache-Control": "private, max-age=31536000, immutable", "ETag": f'"{item.sha256}"'}
    return Response(content=data, media_type=media_type, headers=headers)
