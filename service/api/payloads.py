"""Bodies that come either as multipart uploads or as JSON, read before the sync handler runs.

FastAPI cannot declare "multipart or JSON" on one route, so these async dependencies read
the body by content type, and the routes describe both forms in `openapi_extra`.
"""

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile

from service.errors import ImageTooLarge, UnsupportedMediaType
from service.models import Split
from service.schemas import HoldoutFraction, ImportRequest, JsonObject, Seed, VectorItemsCreate
from service.settings import settings

Body = TypeVar("Body", bound=BaseModel)


@dataclass
class Upload:
    name: str
    data: bytes


@dataclass
class ItemsPayload:
    """Either image uploads (with one split and shared meta) or JSON vectors."""

    uploads: list[Upload] = field(default_factory=list)
    vectors: VectorItemsCreate | None = None
    split: Split = Split.pool
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImportPayload:
    """Either a packaged dataset's name or an uploaded archive, with the import options."""

    dataset: str | None = None
    archive: BinaryIO | None = None
    archive_name: str = ""
    with_labels: bool = False
    holdout_fraction: float = 0.0
    seed: int = 0


def _invalid(loc: str, message: str, type_: str = "value_error") -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", loc), "msg": message, "type": type_}])


def _validate_json(model: type[Body], raw: bytes) -> Body:
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in e.errors()]
        raise RequestValidationError(errors) from None


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _is(request: Request, media_type: str) -> bool:
    return _media_type(request) == media_type


# Async because it does no I/O: FastAPI runs a sync dependency on a worker thread.
async def require_json(request: Request) -> None:
    """415 for a body declared as anything but JSON: FastAPI would hand its bytes to the
    model and answer with a puzzling 422 ("Input should be a valid dictionary")."""
    media_type = _media_type(request)
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaType(
            f"send the body as JSON (Content-Type: application/json), not as {media_type}"
        )


class _FormFields(BaseModel):
    """The non-file fields of a multipart form, validated like a JSON body."""

    split: Split = Split.pool
    meta: JsonObject = {}
    with_labels: bool = False
    holdout_fraction: HoldoutFraction = 0.0
    seed: Seed = 0


def _form_fields(form: FormData) -> _FormFields:
    values: dict[str, Any] = {k: v for k, v in form.items() if isinstance(v, str)}
    if "meta" in values:
        try:
            values["meta"] = json.loads(values["meta"])
        except json.JSONDecodeError:
            raise _invalid("meta", "meta must be a JSON object") from None
    try:
        return _FormFields.model_validate(values)
    except ValidationError as e:
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in e.errors()]
        ) from None


async def items_payload(request: Request) -> ItemsPayload:
    """PNG/JPEG files in the multipart field `files`, or a JSON body of vectors."""
    if _is(request, "application/json"):
        return ItemsPayload(vectors=_validate_json(VectorItemsCreate, await request.body()))
    if not _is(request, "multipart/form-data"):
        raise UnsupportedMediaType(
            "send images as multipart/form-data (field 'files') or vectors as application/json"
        )
    async with request.form(max_files=settings.max_files_per_upload) as form:
        options = _form_fields(form)
        files = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
        if not files:
            raise _invalid("files", "no files: send PNG or JPEG images in the field 'files'")
        uploads = []
        for index, upload in enumerate(files):
            name = upload.filename or f"files[{index}]"
            # Refuse from the spooled size, before reading an oversized file into memory.
            if upload.size is not None and upload.size > settings.max_image_bytes:
                raise ImageTooLarge(
                    f"{name}: {upload.size} bytes exceeds the limit of "
                    f"{settings.max_image_bytes} bytes"
                )
            uploads.append(Upload(name=name, data=await upload.read()))
    return ItemsPayload(uploads=uploads, split=options.split, meta=options.meta)


async def import_payload(request: Request) -> AsyncIterator[ImportPayload]:
    """A JSON body naming a packaged dataset, or an archive in the multipart field `archive`."""
    if _is(request, "application/json"):
        options = _validate_json(ImportRequest, await request.body())
        yield ImportPayload(
            dataset=options.dataset,
            with_labels=options.with_labels,
            holdout_fraction=options.holdout_fraction,
            seed=options.seed,
        )
        return
    if not _is(request, "multipart/form-data"):
        raise UnsupportedMediaType(
            "send a dataset name as application/json or an archive as multipart/form-data"
        )
    # The form, and the archive spooled to disk with it, stay open while the handler runs.
    async with request.form(max_files=1) as form:
        fields = _form_fields(form)
        archive = form.get("archive")
        if not isinstance(archive, UploadFile):
            raise _invalid("archive", "no archive: send a zip or tar file in the field 'archive'")
        yield ImportPayload(
            archive=archive.file,
            archive_name=archive.filename or "archive",
            with_labels=fields.with_labels,
            holdout_fraction=fields.holdout_fraction,
            seed=fields.seed,
        )
