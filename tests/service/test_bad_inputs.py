"""The bad-input catalogue: each bad input of issue 7 is answered with a 4xx whose error code
and detail name the problem, and leaves every table's row count and the blob store as they
were. A repeated submission is the one kind answered with a 2xx, by design: retries must be
safe, so a repeated upload or label is reported as already there and stores nothing new."""

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlmodel import Session

from service.blobs import FileBlobStore
from service.models import InputKind, RoundStatus, Task
from tests.service.factories import (
    bomb_png,
    image_bytes,
    make_items,
    make_pool,
    make_round,
    row_counts,
    stored_blobs,
)

GOOD_PNG = image_bytes(5, (16, 16))
GOOD_JPEG = image_bytes(6, (16, 16), "JPEG")
MNIST = {"name": "mnist", "task": "classification", "classes": ["0", "1"], "input_kind": "image"}


@dataclass(frozen=True)
class World:
    """Ids of the rows the bad requests aim at."""

    digits: int  # an image pool whose ready round queried its items
    digit_items: list[int]
    regression_items: list[int]  # queried by a ready round of a vector pool
    photos: int  # an empty image pool, for uploads
    busy: int  # a pool whose round is still queued
    queued_round: int


# method, path, and the rest of the request as TestClient keywords
Request = tuple[str, str, dict[str, Any]]


@dataclass(frozen=True)
class BadInput:
    kind: str  # as issue 7 names it
    case: str
    request: Callable[[World], Request]
    status: int
    error: str | None  # None: a 2xx, for a repeated submission
    phrase: str  # the detail (or, for a 2xx, the body) must contain it
    first: Callable[[World], Request] | None = None  # sent before the counting starts
    role: str = "admin"


def _flip(data: bytes, position: int) -> bytes:
    flipped = bytearray(data)
    flipped[position] ^= 0xFF
    return bytes(flipped)


def _png_16_bit() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((4, 5), 60_000, dtype=np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(name: str, data: bytes) -> Callable[[World], Request]:
    """A good image, then the bad one, in one upload: the whole batch must be refused."""
    files = [("files", ("good.png", GOOD_PNG)), ("files", (name, data))]
    return lambda w: ("POST", f"/pools/{w.photos}/items", {"files": files})


def raw(method: str, path: str, content: bytes, content_type: str) -> Callable[[World], Request]:
    """A body sent as is, under the given Content-Type; {pool} is the image pool's id."""

    def request(w: World) -> Request:
        return (
            method,
            path.format(pool=w.photos),
            {
                "content": content,
                "headers": {"content-type": content_type},
            },
        )

    return request


def labels(*values: str) -> Callable[[World], Request]:
    """A batch of labels on the digit pool's queried items, one raw JSON value each."""
    return _label_batch(lambda w: w.digit_items, values)


def targets(*values: str) -> Callable[[World], Request]:
    """A batch of regression labels, one raw JSON number (or other literal) each."""
    return _label_batch(lambda w: w.regression_items, values)


def _label_batch(
    items_of: Callable[[World], Sequence[int]], values: Sequence[str]
) -> Callable[[World], Request]:
    def request(w: World) -> Request:
        batch = ", ".join(
            f'{{"item_id": {item}, "value": {value}}}'
            for item, value in zip(items_of(w), values, strict=False)
        )
        body = {"content": f"[{batch}]", "headers": {"content-type": "application/json"}}
        return "POST", "/labels", body

    return request


def get(path: str) -> Callable[[World], Request]:
    return lambda w: ("GET", path, {})


def post(path: str, body: Any = None) -> Callable[[World], Request]:
    return lambda w: ("POST", path, {} if body is None else {"json": body})


CATALOGUE = [
    # -- corrupt PNG -----------------------------------------------------------------------
    BadInput(
        "corrupt PNG",
        "renamed data chunk",
        upload("bad.png", GOOD_PNG.replace(b"IDAT", b"IDAX")),
        400,
        "InvalidImage",
        "bad.png: corrupt or truncated image",
    ),
    BadInput(
        "corrupt PNG",
        "a flipped byte in the pixel data",
        upload("bad.png", _flip(GOOD_PNG, GOOD_PNG.index(b"IDAT") + 10)),
        400,
        "InvalidImage",
        "bad.png: corrupt or truncated image (broken data stream",
    ),
    BadInput(
        "corrupt PNG",
        "header only",
        upload("bad.png", GOOD_PNG[:40]),
        400,
        "InvalidImage",
        "bad.png: corrupt or truncated image",
    ),
    BadInput(
        "corrupt PNG",
        "truncated",
        upload("bad.png", GOOD_PNG[: len(GOOD_PNG) // 2]),
        400,
        "InvalidImage",
        "bad.png: corrupt or truncated image",
    ),
    # -- truncated JPEG --------------------------------------------------------------------
    BadInput(
        "truncated JPEG",
        "half",
        upload("bad.jpg", GOOD_JPEG[: len(GOOD_JPEG) // 2]),
        400,
        "InvalidImage",
        "bad.jpg: corrupt or truncated image",
    ),
    BadInput(
        "truncated JPEG",
        "no end marker",
        upload("bad.jpg", GOOD_JPEG[:-2]),
        400,
        "InvalidImage",
        "bad.jpg: corrupt or truncated image",
    ),
    # -- a 0-byte file ---------------------------------------------------------------------
    BadInput(
        "0-byte file",
        "image upload",
        upload("empty.png", b""),
        400,
        "InvalidImage",
        "empty.png: empty file (0 bytes)",
    ),
    BadInput(
        "0-byte file",
        "archive import",
        lambda w: ("POST", f"/pools/{w.photos}/import", {"files": {"archive": ("a.zip", b"")}}),
        400,
        "InvalidArchive",
        "empty file (0 bytes)",
    ),
    BadInput(
        "0-byte file",
        "JSON body",
        raw("POST", "/pools", b"", "application/json"),
        422,
        "ValidationError",
        "Field required",
    ),
    # -- a decompression bomb --------------------------------------------------------------
    BadInput(
        "decompression bomb",
        "12000x12000 PNG",
        upload("bomb.png", bomb_png()),
        413,
        "ImageTooLarge",
        "bomb.png: 12000x12000 = 144000000 pixels exceeds the limit",
    ),
    # -- a huge body -----------------------------------------------------------------------
    BadInput(
        "huge body",
        "declared 1 GiB",
        lambda w: (
            "POST",
            f"/pools/{w.photos}/items",
            # Refused from the header: the body itself is never read.
            {
                "content": b"x",
                "headers": {
                    "content-type": "multipart/form-data; boundary=x",
                    "content-length": str(2**30),
                },
            },
        ),
        413,
        "PayloadTooLarge",
        "1073741824 bytes or more exceeds the limit of 268435456 bytes",
    ),
    # -- wrong content types ---------------------------------------------------------------
    BadInput(
        "wrong content type",
        "raw PNG body for items",
        raw("POST", "/pools/{pool}/items", GOOD_PNG, "image/png"),
        415,
        "UnsupportedMediaType",
        "multipart/form-data",
    ),
    BadInput(
        "wrong content type",
        "text for an import",
        raw("POST", "/pools/{pool}/import", b"digits", "text/plain"),
        415,
        "UnsupportedMediaType",
        "application/json",
    ),
    BadInput(
        "wrong content type",
        "form fields for a pool",
        raw(
            "POST", "/pools", b"name=mnist&task=classification", "application/x-www-form-urlencoded"
        ),
        415,
        "UnsupportedMediaType",
        "send the body as JSON (Content-Type: application/json)",
    ),
    BadInput(
        "wrong content type",
        "JSON labelled as text",
        raw("POST", "/labels", b'{"item_id": 1, "value": "1"}', "text/plain"),
        415,
        "UnsupportedMediaType",
        "not as text/plain",
        role="annotator",
    ),
    BadInput(
        "wrong content type",
        "multipart for a round",
        lambda w: ("POST", "/rounds", {"files": {"pool_id": ("p", str(w.digits).encode())}}),
        415,
        "UnsupportedMediaType",
        "not as multipart/form-data",
    ),
    BadInput(
        "wrong content type",
        "a PDF as an image",
        upload("doc.png", b"%PDF-1.4 definitely not an image"),
        400,
        "InvalidImage",
        "doc.png: not a PNG or JPEG image",
    ),
    BadInput(
        "wrong content type",
        "a GIF",
        upload("anim.gif", image_bytes(6, (4, 4), "GIF")),
        400,
        "InvalidImage",
        "anim.gif: not a PNG or JPEG image",
    ),
    BadInput(
        "wrong content type",
        "a BMP",
        upload("old.bmp", image_bytes(7, (4, 4), "BMP")),
        400,
        "InvalidImage",
        "old.bmp: not a PNG or JPEG image",
    ),
    BadInput(
        "wrong content type",
        "16-bit PNG",
        upload("deep.png", _png_16_bit()),
        415,
        "UnsupportedMediaType",
        "deep.png: I;16 pixels (16-bit or float) are not supported",
    ),
    # -- unknown classes -------------------------------------------------------------------
    BadInput(
        "unknown class",
        "a name",
        labels('"1"', '"cat"'),
        400,
        "InvalidLabel",
        "'cat' is not a class of its pool",
        role="annotator",
    ),
    BadInput(
        "unknown class",
        "a number naming no class",
        labels('"1"', "10"),
        400,
        "InvalidLabel",
        "10.0 is not a class of its pool",
        role="annotator",
    ),
    # -- NaN and infinite targets ----------------------------------------------------------
    *(
        BadInput(
            "NaN or infinite target",
            literal,
            targets("1.0", literal),
            422,
            "ValidationError",
            "finite number",
            role="annotator",
        )
        for literal in ("NaN", "Infinity", "-Infinity", "1e400")
    ),
    # -- unknown ids -----------------------------------------------------------------------
    BadInput("unknown id", "pool", get("/pools/987654"), 404, "PoolNotFound", "no pool 987654"),
    BadInput("unknown id", "item", get("/items/424242"), 404, "ItemNotFound", "no item 424242"),
    BadInput("unknown id", "item image", get("/items/424242/image"), 404, "ItemNotFound", "424242"),
    BadInput("unknown id", "round", get("/rounds/424242"), 404, "RoundNotFound", "424242"),
    BadInput(
        "unknown id",
        "round's queries",
        get("/queries/424242"),
        404,
        "RoundNotFound",
        "no round 424242",
        role="annotator",
    ),
    BadInput("unknown id", "cancel", post("/rounds/424242/cancel"), 404, "RoundNotFound", "424242"),
    BadInput("unknown id", "key", post("/keys/424242/revoke"), 404, "KeyNotFound", "424242"),
    BadInput(
        "unknown id",
        "pool of an upload",
        lambda w: ("POST", "/pools/424242/items", {"files": {"files": ("a.png", GOOD_PNG)}}),
        404,
        "PoolNotFound",
        "no pool 424242",
    ),
    BadInput(
        "unknown id",
        "pool of an import",
        post("/pools/424242/import", {"dataset": "digits"}),
        404,
        "PoolNotFound",
        "no pool 424242",
    ),
    BadInput(
        "unknown id",
        "pool of a round",
        post("/rounds", {"pool_id": 424242}),
        404,
        "PoolNotFound",
        "no pool 424242",
    ),
    BadInput(
        "unknown id",
        "item in a label batch",
        lambda w: (
            "POST",
            "/labels",
            {
                "json": [
                    {"item_id": w.digit_items[0], "value": "1"},
                    {"item_id": 987654, "value": "1"},
                ]
            },
        ),
        404,
        "ItemNotFound",
        "no items [987654]",
        role="annotator",
    ),
    # -- malformed ids ---------------------------------------------------------------------
    BadInput("malformed id", "not a number", get("/pools/abc"), 422, "ValidationError", "pool_id"),
    BadInput(
        "malformed id",
        "negative",
        get("/items/-1"),
        422,
        "ValidationError",
        "greater than or equal to 1",
    ),
    BadInput(
        "malformed id",
        "past 32 bits in a path",
        get("/rounds/99999999999999999999"),
        422,
        "ValidationError",
        "less than or equal to 2147483647",
    ),
    BadInput(
        "malformed id",
        "past 32 bits in a body",
        post("/labels", {"item_id": 2**31, "value": "1"}),
        422,
        "ValidationError",
        "less than or equal to 2147483647",
    ),
    BadInput(
        "malformed id",
        "a string in a body",
        post("/labels", {"item_id": "x", "value": "1"}),
        422,
        "ValidationError",
        "item_id",
    ),
    BadInput(
        "malformed id", "zero", post("/rounds", {"pool_id": 0}), 422, "ValidationError", "pool_id"
    ),
    # -- duplicate submissions -------------------------------------------------------------
    BadInput(
        "duplicate submission",
        "pool name",
        post("/pools", MNIST),
        409,
        "PoolNameTaken",
        "a pool named 'mnist' already exists",
        first=post("/pools", MNIST),
    ),
    BadInput(
        "duplicate submission",
        "a second active round",
        lambda w: ("POST", "/rounds", {"json": {"pool_id": w.busy}}),
        409,
        "RoundInProgress",
        "is still queued or running",
    ),
    BadInput(
        "duplicate submission",
        "cancel twice",
        lambda w: ("POST", f"/rounds/{w.queued_round}/cancel", {}),
        409,
        "RoundNotCancellable",
        "is cancelled; only queued or running rounds can be cancelled",
        first=lambda w: ("POST", f"/rounds/{w.queued_round}/cancel", {}),
    ),
    BadInput(
        "duplicate submission",
        "the same image again",
        lambda w: ("POST", f"/pools/{w.photos}/items", {"files": {"files": ("a.png", GOOD_PNG)}}),
        201,
        None,
        '"created":[],"duplicates":[{"index":0,"name":"a.png"',
        first=lambda w: (
            "POST",
            f"/pools/{w.photos}/items",
            {"files": {"files": ("a.png", GOOD_PNG)}},
        ),
    ),
    BadInput(
        "duplicate submission",
        "the same label again",
        labels('"1"'),
        200,
        None,
        '"created":0',
        first=labels('"1"'),
        role="annotator",
    ),
]


@pytest.fixture
def world(session: Session, blobs: FileBlobStore) -> World:
    digits = make_pool(session)
    digit_items = make_items(session, blobs, digits, 3)
    make_round(session, digits, queried=digit_items)
    regression = make_pool(session, task=Task.regression, input_kind=InputKind.vector)
    regression_items = make_items(session, blobs, regression, 3)
    make_round(session, regression, queried=regression_items)
    photos = make_pool(session)
    busy = make_pool(session)
    queued = make_round(session, busy, status=RoundStatus.queued)
    return World(
        digits=digits.id,  # type: ignore[arg-type]
        digit_items=[i.id for i in digit_items],  # type: ignore[misc]
        regression_items=[i.id for i in regression_items],  # type: ignore[misc]
        photos=photos.id,  # type: ignore[arg-type]
        busy=busy.id,  # type: ignore[arg-type]
        queued_round=queued.id,  # type: ignore[arg-type]
    )


def _send(
    client: TestClient, request: Callable[[World], Request], world: World, key: dict[str, str]
) -> Any:
    method, path, options = request(world)
    headers = {**key, **options.pop("headers", {})}
    return client.request(method, path, headers=headers, **options)


@pytest.mark.parametrize("bad", CATALOGUE, ids=[f"{bad.kind}: {bad.case}" for bad in CATALOGUE])
def test_a_bad_input_is_refused_naming_the_problem_and_stores_nothing(
    client: TestClient,
    session: Session,
    blobs: FileBlobStore,
    admin: dict[str, str],
    annotator: dict[str, str],
    world: World,
    bad: BadInput,
) -> None:
    key = admin if bad.role == "admin" else annotator
    if bad.first is not None:
        assert _send(client, bad.first, world, key).is_success
    rows, files = row_counts(session), stored_blobs(blobs)
    response = _send(client, bad.request, world, key)
    assert response.status_code == bad.status, response.text
    if bad.error is None:
        assert bad.phrase in response.text
    else:
        body = response.json()
        assert body.keys() == {"error", "detail"} and body["error"] == bad.error, body
        assert bad.phrase in str(body["detail"]), body["detail"]
    assert row_counts(session) == rows
    assert stored_blobs(blobs) == files
