"""POST /pools/{id}/import: packaged datasets, image-folder and IDX archives, and refusals."""

import gzip
import io
import struct
import tarfile
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from service.blobs import FileBlobStore
from service.images import load_npy
from service.models import InputKind, Item, Label, Split, Task
from service.settings import settings
from tests.service.factories import image_bytes, make_items, make_pool, row_counts


def idx(array: np.ndarray) -> bytes:
    """An array in LeCun's IDX format (unsigned bytes)."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def zip_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_of(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return buffer.getvalue()


def folder_archive() -> bytes:
    """An image folder with train/ and test/, inside a top-level folder as zips usually are."""
    files = {}
    for i in range(3):
        files[f"pets/train/3/{i}.png"] = image_bytes(10 + i, (6, 5))
        files[f"pets/train/7/{i}.png"] = image_bytes(20 + i, (6, 5))
    files["pets/test/7/t.png"] = image_bytes(30, (6, 5))
    files["pets/.DS_Store"] = b"junk"
    files["__MACOSX/pets/._x"] = b"junk"
    return zip_of(files)


def mnist_archive(n_train: int = 4, n_test: int = 2) -> bytes:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n_train + n_test, 28, 28), dtype=np.uint8)
    y = np.arange(n_train + n_test) % 10
    return tar_of(
        {
            "mnist/train-images-idx3-ubyte.gz": gzip.compress(idx(x[:n_train])),
            "mnist/train-labels-idx1-ubyte.gz": gzip.compress(idx(y[:n_train])),
            "mnist/t10k-images-idx3-ubyte": idx(x[n_train:]),
            "mnist/t10k-labels-idx1-ubyte": idx(y[n_train:]),
        }
    )


def _upload(client: TestClient, pool_id: int, archive: bytes, headers: dict, **data: str):  # type: ignore[no-untyped-def]
    return client.post(
        f"/pools/{pool_id}/import",
        files={"archive": ("data.zip", archive)},
        data=data,
        headers=headers,
    )


def test_import_a_packaged_dataset_with_a_holdout(
    client: TestClient, session: Session, blobs: FileBlobStore, admin: dict
) -> None:
    pool = make_pool(session, name="digits")
    response = client.post(
        f"/pools/{pool.id}/import",
        json={"dataset": "digits", "holdout_fraction": 0.2, "seed": 1},
        headers=admin,
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["added"] == {"pool": 1438, "holdout": 359} and body["duplicates"] == 0
    assert body["labels"] == 359  # the holdout's: the evaluation set
    counts = client.get(f"/pools/{pool.id}", headers=admin).json()
    assert (counts["items"], counts["holdout"], counts["labeled"]) == (1438, 359, 0)
    item = session.exec(select(Item).where(Item.pool_id == pool.id).limit(1)).one()
    assert (item.format, item.shape, item.dtype) == ("npy", [8, 8], "uint8")
    assert load_npy(blobs.get(item.sha256)).shape == (8, 8)
    labeled_splits = session.exec(
        select(Item.split).join(Label, col(Label.item_id) == col(Item.id)).distinct()
    ).all()
    assert labeled_splits == [Split.holdout]
    again = client.post(f"/pools/{pool.id}/import", json={"dataset": "digits"}, headers=admin)
    assert again.json()["added"] == {"pool": 0, "holdout": 0}
    assert again.json()["duplicates"] == 1797


def test_with_labels_stores_seed_labels_for_the_pool_split(
    client: TestClient, session: Session, admin: dict
) -> None:
    pool = make_pool(
        session, task=Task.regression, input_kind=InputKind.vector, target="progression"
    )
    body = client.post(
        f"/pools/{pool.id}/import", json={"dataset": "diabetes", "with_labels": True}, headers=admin
    ).json()
    assert body["added"]["pool"] == 442 and body["labels"] == 442
    assert client.get(f"/pools/{pool.id}", headers=admin).json()["labeled"] == 442
    label = session.exec(select(Label).where(Label.pool_id == pool.id).limit(1)).one()
    assert label.value_number is not None and label.round_id is None


def test_import_an_image_folder_archive(
    client: TestClient, session: Session, blobs: FileBlobStore, admin: dict
) -> None:
    pool = make_pool(session, classes=["3", "5", "7"])
    response = _upload(client, pool.id, folder_archive(), admin)  # type: ignore[arg-type]
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["added"] == {"pool": 6, "holdout": 1} and body["labels"] == 1
    assert body["source"] == "data.zip"
    holdout = session.exec(
        select(Item).where(Item.pool_id == pool.id, Item.split == Split.holdout)
    ).one()
    label = session.exec(select(Label).where(Label.item_id == holdout.id)).one()
    assert label.value_class == "7"
    image = client.get(f"/items/{holdout.id}/image", headers=admin)
    assert image.headers["content-type"] == "image/png" and holdout.shape == [5, 6, 3]


def test_import_an_idx_archive(client: TestClient, session: Session, admin: dict) -> None:
    pool = make_pool(session)
    response = _upload(client, pool.id, mnist_archive(), admin, with_labels="true")  # type: ignore[arg-type]
    assert response.status_code == 201, response.text
    assert response.json()["added"] == {"pool": 4, "holdout": 2}
    assert response.json()["labels"] == 6


@pytest.mark.parametrize(
    ("archive", "status", "error", "words"),
    [
        (b"plain text, not an archive", 400, "InvalidArchive", "zip or tar"),
        (zip_of({"../evil/3/a.png": image_bytes(1)}), 400, "InvalidArchive", "outside"),
        (zip_of({"/abs/3/a.png": image_bytes(1)}), 400, "InvalidArchive", "outside"),
        (
            tar_of({"d/3/a.png": image_bytes(1)}, {"d/7/b.png": "/etc/passwd"}),
            400,
            "InvalidArchive",
            "regular file",
        ),
        (zip_of({"readme.txt": b"hello"}), 400, "InvalidArchive", "no .png"),
        (
            zip_of({"d/3/a.png": b"not a png", "d/7/b.png": image_bytes(1)}),
            400,
            "InvalidArchive",
            "a.png",
        ),
        (
            zip_of({"d/3/a.png": image_bytes(1, (4, 4)), "d/7/b.png": image_bytes(2, (5, 5))}),
            400,
            "InvalidArchive",
            "size",
        ),
        (
            zip_of({"d/cat/a.png": image_bytes(1), "d/7/b.png": image_bytes(2)}),
            409,
            "DatasetMismatch",
            "cat",
        ),
        (
            tar_of({"train-images-idx3-ubyte": idx(np.zeros((2, 4, 4)))}),
            400,
            "InvalidArchive",
            "not its train pair",
        ),
    ],
    ids=[
        "not an archive",
        "dot-dot path",
        "absolute path",
        "symlink",
        "no images",
        "corrupt image",
        "mixed sizes",
        "unknown class",
        "IDX without labels",
    ],
)
def test_bad_archives_are_refused_and_store_nothing(
    client: TestClient,
    session: Session,
    blobs: FileBlobStore,
    admin: dict,
    archive: bytes,
    status: int,
    error: str,
    words: str,
) -> None:
    pool = make_pool(session)
    before = row_counts(session)
    response = _upload(client, pool.id, archive, admin)  # type: ignore[arg-type]
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert words in response.json()["detail"]
    assert row_counts(session) == before and not blobs.root.exists()


def test_archives_unpacking_past_the_limit_are_413(
    client: TestClient, session: Session, admin: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "max_archive_unpacked_bytes", 10_000)
    pool = make_pool(session)
    bomb = zip_of(
        {"d/3/a.png": b"\0" * 50_000, "d/7/b.png": image_bytes(1)}
    )  # compresses to ~100 B
    before = row_counts(session)
    response = _upload(client, pool.id, bomb, admin)  # type: ignore[arg-type]
    assert response.status_code == 413 and "10000 bytes" in response.json()["detail"]
    assert row_counts(session) == before


def test_archive_images_over_the_pixel_limit_are_413(
    client: TestClient, session: Session, admin: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "max_image_pixels", 20)
    pool = make_pool(session)
    response = _upload(client, pool.id, folder_archive(), admin)  # type: ignore[arg-type]
    assert response.status_code == 413 and response.json()["error"] == "ImageTooLarge"


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"dataset": "imagenet"}, 422, "ValidationError"),
        ({"dataset": "digits", "holdout_fraction": 1.0}, 422, "ValidationError"),
        ({"dataset": "diabetes"}, 409, "DatasetMismatch"),
    ],
    ids=["unknown dataset", "all holdout", "regression data into a classification pool"],
)
def test_bad_packaged_imports_are_refused(
    client: TestClient, session: Session, admin: dict, body: dict, status: int, error: str
) -> None:
    pool = make_pool(session)
    before = row_counts(session)
    response = client.post(f"/pools/{pool.id}/import", json=body, headers=admin)
    assert response.status_code == status and response.json()["error"] == error
    if body["dataset"] == "imagenet":
        assert "mnist-5k" in str(response.json()["detail"])
    assert row_counts(session) == before


def test_import_without_a_body_is_refused(
    client: TestClient, session: Session, admin: dict
) -> None:
    pool = make_pool(session)
    assert client.post(f"/pools/{pool.id}/import", headers=admin).status_code == 415
    response = client.post(f"/pools/{pool.id}/import", files={"x": ("a", b"1")}, headers=admin)
    assert response.status_code == 422
    assert (
        client.post("/pools/999999/import", json={"dataset": "digits"}, headers=admin).status_code
        == 404
    )


def test_an_import_of_another_shape_than_the_pools_items_is_409_and_stores_nothing(
    client: TestClient, session: Session, blobs: FileBlobStore, admin: dict
) -> None:
    pool = make_pool(session, classes=["3", "5", "7"])
    make_items(session, blobs, pool, 2)  # 8x8 grey; the folder archive holds 6x5 colour
    before = row_counts(session)
    response = _upload(client, pool.id, folder_archive(), admin)  # type: ignore[arg-type]
    assert response.status_code == 409 and response.json()["error"] == "ShapeMismatch"
    assert "[5, 6, 3]" in response.json()["detail"] and "[8, 8]" in response.json()["detail"]
    assert row_counts(session) == before


@pytest.mark.parametrize("fraction", [1.0, 1.5, -0.1])
def test_holdout_fraction_has_the_same_bounds_as_json_and_as_a_form(
    client: TestClient, session: Session, admin: dict, fraction: float
) -> None:
    pool = make_pool(session, classes=["3", "5", "7"])
    before = row_counts(session)
    as_json = client.post(
        f"/pools/{pool.id}/import",
        json={"dataset": "digits", "holdout_fraction": fraction},
        headers=admin,
    )
    as_form = _upload(client, pool.id, folder_archive(), admin, holdout_fraction=str(fraction))  # type: ignore[arg-type]
    assert as_json.status_code == as_form.status_code == 422
    json_error, form_error = as_json.json()["detail"][0], as_form.json()["detail"][0]
    assert json_error["loc"] == form_error["loc"] == ["body", "holdout_fraction"]
    assert json_error["type"] == form_error["type"] and json_error["msg"] == form_error["msg"]
    assert row_counts(session) == before
