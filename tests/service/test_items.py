"""Adding items (image uploads, JSON vectors), reading them back, and refusing bad uploads
without storing anything (issue 7's catalogue of bad inputs is in test_bad_inputs.py)."""

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageFile
from sqlmodel import Session, select

from service.blobs import FileBlobStore
from service.errors import ImageTooLarge
from service.images import decode_array, inspect_image
from service.models import InputKind, Item, Split, Task
from service.settings import settings
from tests.service.factories import (
    bomb_png,
    image_bytes,
    make_items,
    make_pool,
    row_counts,
    stored_blobs,
)


def _files(*blobs: bytes, name: str = "img") -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (f"{name}{i}.png", data)) for i, data in enumerate(blobs)]


def test_upload_png_and_jpeg_images(
    client: TestClient, session: Session, blobs: FileBlobStore, admin: dict
) -> None:
    pool = make_pool(session)
    png, jpeg = image_bytes(1, (8, 6)), image_bytes(2, (8, 6), "JPEG")
    response = client.post(
        f"/pools/{pool.id}/items",
        files=[("files", ("a.png", png)), ("files", ("b.jpg", jpeg))],
        data={"split": "holdout", "meta": '{"batch": 7}'},
        headers=admin,
    )
    assert response.status_code == 201, response.text
    created = response.json()["created"]
    assert [c["format"] for c in created] == ["png", "jpeg"]
    assert created[0]["shape"] == [6, 8, 3] and created[1]["shape"] == [6, 8, 3]
    assert all(c["split"] == "holdout" and c["kind"] == "image" for c in created)
    assert created[0]["meta"] == {"batch": 7, "filename": "a.png"}
    assert created[0]["image_url"].endswith(f"/items/{created[0]['id']}/image")
    # Stored as the original bytes, under their hash.
    assert blobs.get(created[0]["sha256"]) == png
    image = client.get(f"/items/{created[1]['id']}/image", headers=admin)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content == jpeg


def test_duplicates_are_detected_by_hash(client: TestClient, session: Session, admin: dict) -> None:
    pool = make_pool(session)
    first = client.post(f"/pools/{pool.id}/items", files=_files(image_bytes(1)), headers=admin)
    existing = first.json()["created"][0]["id"]
    again = client.post(
        f"/pools/{pool.id}/items",
        files=_files(image_bytes(2), image_bytes(1), image_bytes(2)),
        headers=admin,
    )
    assert again.status_code == 201
    body = again.json()
    assert len(body["created"]) == 1
    new = body["created"][0]["id"]
    assert [(d["index"], d["item_id"]) for d in body["duplicates"]] == [(1, existing), (2, new)]
    assert len(session.exec(select(Item).where(Item.pool_id == pool.id)).all()) == 2


def test_the_same_image_may_be_in_two_pools(
    client: TestClient, session: Session, admin: dict
) -> None:
    a, b = make_pool(session), make_pool(session)
    for pool in (a, b):
        response = client.post(
            f"/pools/{pool.id}/items", files=_files(image_bytes(1)), headers=admin
        )
        assert len(response.json()["created"]) == 1


def test_add_vectors_as_json(
    client: TestClient, session: Session, blobs: FileBlobStore, admin: dict
) -> None:
    pool = make_pool(session, task=Task.regression, input_kind=InputKind.vector)
    response = client.post(
        f"/pools/{pool.id}/items",
        json={"vectors": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.5]], "meta": [{"id": "a"}, {"id": "b"}]},
        headers=admin,
    )
    assert response.status_code == 201, response.text
    created = response.json()["created"]
    assert [c["shape"] for c in created] == [[3], [3]]
    assert created[1]["meta"] == {"id": "b"} and created[1]["image_url"] is None
    item = client.get(f"/items/{created[1]['id']}", headers=admin).json()
    assert item["vector"] == [4.0, 5.0, 6.5] and item["format"] == "npy"


def test_read_an_array_image_as_png(
    client: TestClient, session: Session, blobs: FileBlobStore, annotator: dict
) -> None:
    pool = make_pool(session)
    [item] = make_items(session, blobs, pool, 1)
    response = client.get(f"/items/{item.id}/image", headers=annotator)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["etag"] == f'"{item.sha256}"'
    pixels = np.asarray(Image.open(io.BytesIO(response.content)))
    assert pixels.shape == (8, 8) and pixels.dtype == np.uint8
    body = client.get(f"/items/{item.id}", headers=annotator).json()
    assert body["sha256"] == item.sha256 and body["split"] == "pool" and body["vector"] is None


def test_a_vector_has_no_image(
    client: TestClient, session: Session, blobs: FileBlobStore, admin: dict
) -> None:
    pool = make_pool(session, task=Task.regression, input_kind=InputKind.vector)
    [item] = make_items(session, blobs, pool, 1)
    response = client.get(f"/items/{item.id}/image", headers=admin)
    assert response.status_code == 404 and response.json()["error"] == "NoImage"


GOOD = image_bytes(5, (16, 16))


def test_the_bomb_is_refused_from_its_header(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pixel limit holds before decoding: a decoded 12000x12000 image would take 144 MB."""
    bomb = bomb_png()

    def no_decoding(self: Image.Image) -> None:
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageTooLarge, match="exceeds the limit"):
        inspect_image(bomb, "bomb.png", 10**9, 10**6)


def test_images_over_the_byte_limit_are_413(
    client: TestClient,
    session: Session,
    blobs: FileBlobStore,
    admin: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settings, "max_image_bytes", 100)
    pool = make_pool(session)
    before = row_counts(session)
    response = client.post(f"/pools/{pool.id}/items", files=_files(GOOD), headers=admin)
    assert response.status_code == 413 and response.json()["error"] == "ImageTooLarge"
    assert row_counts(session) == before and stored_blobs(blobs) == 0


def test_images_over_the_pixel_limit_are_413(
    client: TestClient, session: Session, admin: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "max_image_pixels", 100)
    pool = make_pool(session)
    before = row_counts(session)
    response = client.post(f"/pools/{pool.id}/items", files=_files(GOOD), headers=admin)
    assert response.status_code == 413 and "16x16" in response.json()["detail"]
    assert row_counts(session) == before


@pytest.mark.parametrize(
    ("kind", "body", "status", "error"),
    [
        ("image", {"vectors": [[1.0]]}, 400, "WrongInputKind"),
        ("vector", "files", 400, "WrongInputKind"),
        ("vector", {"vectors": [[1.0, 2.0], [3.0]]}, 422, "ValidationError"),
        ("vector", {"vectors": []}, 422, "ValidationError"),
        ("vector", '{"vectors": [[1.0, NaN]]}', 422, "ValidationError"),
        ("vector", '{"vectors": [[1.0, Infinity]]}', 422, "ValidationError"),
        ("vector", {"vectors": [[1e39]]}, 400, "BadInput"),
        ("vector", {"vectors": [[1.0]], "meta": [{}, {}]}, 422, "ValidationError"),
        ("vector", "{not json", 422, "ValidationError"),
        ("image", "no files", 422, "ValidationError"),
        ("image", "split", 422, "ValidationError"),
        ("image", "meta", 422, "ValidationError"),
        ("vector", '{"vectors": [[1.0]], "meta": [{"x": NaN}]}', 422, "ValidationError"),
    ],
    ids=[
        "vectors into an image pool",
        "images into a vector pool",
        "ragged vectors",
        "no vectors",
        "NaN",
        "infinity",
        "float32 overflow",
        "meta length",
        "broken JSON",
        "multipart without files",
        "unknown split",
        "NaN in form meta",
        "NaN in JSON meta",
    ],
)
def test_bad_item_bodies_are_refused_and_store_nothing(
    client: TestClient,
    session: Session,
    blobs: FileBlobStore,
    admin: dict,
    kind: str,
    body: object,
    status: int,
    error: str,
) -> None:
    if kind == "image":
        pool = make_pool(session)
    else:
        pool = make_pool(session, task=Task.regression, input_kind=InputKind.vector)
    before = row_counts(session)
    url = f"/pools/{pool.id}/items"
    if body == "files":
        response = client.post(url, files=_files(GOOD), headers=admin)
    elif body == "no files":
        response = client.post(url, files={"other": ("x.txt", b"x")}, headers=admin)
    elif body == "split":
        response = client.post(url, files=_files(GOOD), data={"split": "train"}, headers=admin)
    elif body == "meta":
        response = client.post(url, files=_files(GOOD), data={"meta": '{"x": NaN}'}, headers=admin)
    elif isinstance(body, str):
        headers = {**admin, "content-type": "application/json"}
        response = client.post(url, content=body, headers=headers)
    else:
        response = client.post(url, json=body, headers=admin)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert row_counts(session) == before and stored_blobs(blobs) == 0


def test_vectors_must_match_the_pool_dimension(
    client: TestClient, session: Session, blobs: FileBlobStore, admin: dict
) -> None:
    pool = make_pool(session, task=Task.regression, input_kind=InputKind.vector)
    make_items(session, blobs, pool, 1)  # 4 values each
    before = row_counts(session)
    response = client.post(f"/pools/{pool.id}/items", json={"vectors": [[1.0, 2.0]]}, headers=admin)
    assert response.status_code == 409 and response.json()["error"] == "ShapeMismatch"
    assert "[4]" in response.json()["detail"]
    assert row_counts(session) == before


def test_holdout_split_is_recorded(client: TestClient, session: Session, admin: dict) -> None:
    pool = make_pool(session)
    client.post(
        f"/pools/{pool.id}/items", files=_files(GOOD), data={"split": "holdout"}, headers=admin
    )
    item = session.exec(select(Item).where(Item.pool_id == pool.id)).one()
    assert item.split == Split.holdout


def _png(mode: str, size: tuple[int, int] = (5, 4)) -> bytes:
    """A PNG of `mode` with varied pixels (so each mode gives different bytes)."""
    rng = np.random.default_rng(len(mode) + ord(mode[0]))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    image = image.convert(mode) if mode != "P" else image.quantize(8)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "shape"),
    [
        ("RGB", [4, 5, 3]),
        ("RGBA", [4, 5, 3]),
        ("P", [4, 5, 3]),
        ("L", [4, 5]),
        ("LA", [4, 5]),
        ("1", [4, 5]),
    ],
)
def test_an_image_is_recorded_with_the_shape_it_decodes_to(mode: str, shape: list[int]) -> None:
    data = _png(mode)
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == mode
    info = inspect_image(data, "x.png", 10**6, 10**6)
    pixels = decode_array(data)
    assert info.shape == list(pixels.shape) == shape
    assert info.dtype == str(pixels.dtype) == "uint8"


def test_colour_images_with_and_without_alpha_share_one_pool(
    client: TestClient, session: Session, admin: dict
) -> None:
    pool = make_pool(session)
    response = client.post(
        f"/pools/{pool.id}/items", files=_files(_png("RGB"), _png("RGBA"), _png("P")), headers=admin
    )
    assert response.status_code == 201, response.text
    assert [c["shape"] for c in response.json()["created"]] == [[4, 5, 3]] * 3


@pytest.mark.parametrize(
    ("first", "then"),
    [
        ([image_bytes(1, (8, 6))], [image_bytes(2, (5, 4))]),
        ([_png("L")], [_png("RGB")]),
        ([], [image_bytes(1, (8, 6)), image_bytes(2, (5, 4))]),
    ],
    ids=["another size", "grey after colour", "two sizes in one upload"],
)
def test_images_of_another_shape_than_the_pools_are_409_and_store_nothing(
    client: TestClient,
    session: Session,
    blobs: FileBlobStore,
    admin: dict,
    first: list[bytes],
    then: list[bytes],
) -> None:
    pool = make_pool(session)
    if first:
        assert client.post(
            f"/pools/{pool.id}/items", files=_files(*first), headers=admin
        ).is_success
    before, stored = row_counts(session), stored_blobs(blobs)
    response = client.post(f"/pools/{pool.id}/items", files=_files(*then), headers=admin)
    assert response.status_code == 409 and response.json()["error"] == "ShapeMismatch"
    assert "shape" in response.json()["detail"]
    assert row_counts(session) == before and stored_blobs(blobs) == stored
