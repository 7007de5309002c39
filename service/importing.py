"""Importing a whole dataset into a pool: from a packaged dataset, an archive or a folder.

Images arrive as arrays and are stored as .npy blobs. Ground truth is not stored as labels,
with two exceptions: the holdout split's labels, which are the evaluation set the worker
measures each round against (never queried, never counted as labeled); and, when an admin
asks for `with_labels`, the pool split's labels as seed labels.
"""

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from sqlalchemy import insert
from sqlmodel import Session, col, select

from service import datasets
from service.blobs import BlobStore, blob_key
from service.crud import check_shapes
from service.datasets import ArrayDataset
from service.errors import DatasetMismatch, ImageTooLarge, InvalidArchive
from service.images import npy_bytes
from service.models import Item, Label, Pool, Split, Task, utcnow

IMPORT_ANNOTATOR = "import"


@dataclass
class ImportResult:
    added: dict[str, int]
    duplicates: int
    labels: int


def _dataset_root(folder: Path) -> Path:
    """Step into a lone top-level folder, as archives of a folder usually have one."""
    while True:
        entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
        if len(entries) == 1 and entries[0].is_dir() and entries[0].name not in ("train", "test"):
            folder = entries[0]
        else:
            return folder


def _check_pixels(folder: Path, max_pixels: int) -> None:
    """Refuse oversized images from their headers, before the reader decodes any of them."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if not name.lower().endswith(datasets.IMAGE_SUFFIXES):
                continue
            path = Path(root) / name
            try:
                with Image.open(path) as image:
                    width, height = image.size
            except Exception:
                continue  # the reader names unreadable files
            if width * height > max_pixels:
                raise ImageTooLarge(
                    f"{path.relative_to(folder)}: {width}x{height} pixels exceeds the limit "
                    f"of {max_pixels} pixels"
                )


def read_folder(folder: Path, max_pixels: int) -> dict[str, ArrayDataset]:
    """IDX files (MNIST layout), or images in one sub-folder per class (optionally under
    train/ and test/), as {"train": ..., "test": ...}."""
    root = _dataset_root(folder)
    try:
        if any("idx" in p.name and "ubyte" in p.name for p in root.iterdir()):
            return datasets.read_mnist(root)
        _check_pixels(root, max_pixels)
        return datasets.read_image_folder_splits(root)
    except (ValueError, FileNotFoundError) as e:
        # The readers name the file; drop our temporary folder from the message.
        raise InvalidArchive(
            str(e).replace(f"{folder}/", "").replace(str(folder), "archive")
        ) from e


def _check_fits(pool: Pool, ds: ArrayDataset, source: str) -> None:
    if ds.task != pool.task or ds.input_kind != pool.input_kind:
        raise DatasetMismatch(
            f"{source} is a {ds.task} dataset of {ds.input_kind}s; pool {pool.id} is a "
            f"{pool.task} pool of {pool.input_kind}s"
        )
    if ds.task == Task.classification:
        unknown = sorted(set(ds.classes or ()) - set(pool.classes or ()))
        if unknown:
            raise DatasetMismatch(
                f"{source} has classes {unknown} that pool {pool.id} does not "
                f"(its classes: {pool.classes})"
            )


def import_dataset(
    session: Session,
    blobs: BlobStore,
    pool: Pool,
    splits: dict[str, ArrayDataset],
    *,
    source: str,
    with_labels: bool = False,
    holdout_fraction: float = 0.0,
    seed: int = 0,
) -> ImportResult:
    """Add a dataset's items to `pool` (flushed): train -> pool split, test -> holdout.

    Without a test split, `holdout_fraction` of train is set aside as holdout (stratified,
    seeded). Items whose bytes the pool already holds are skipped.
    """
    train = splits["train"]
    for ds in splits.values():
        _check_fits(pool, ds, source)
    check_shapes(
        session, pool, [(f"{source} ({name})", list(ds.x.shape[1:])) for name, ds in splits.items()]
    )
    parts: list[tuple[Split, str, ArrayDataset]] = [(Split.pool, "train", train)]
    if "test" in splits:
        parts.append((Split.holdout, "test", splits["test"]))
    elif holdout_fraction > 0:
        try:
            kept, held = datasets.split(train, holdout_fraction, seed)
        except ValueError as e:
            raise InvalidArchive(f"{source}: {e}") from e
        parts = [(Split.pool, "train", kept), (Split.holdout, "train", held)]

    known = set(session.exec(select(Item.sha256).where(Item.pool_id == pool.id)))
    now = utcnow()
    item_rows: list[dict] = []
    answers: list[str | float | None] = []  # the label to store with each new item, if any
    new_blobs: list[bytes] = []
    duplicates = 0
    for split, origin, ds in parts:
        store_labels = split == Split.holdout or with_labels
        for index in range(len(ds)):
            x = ds.x[index]
            data = npy_bytes(x)
            key = blob_key(data)
            if key in known:
                duplicates += 1
                continue
            known.add(key)
            new_blobs.append(data)
            item_rows.append(
                {
                    "pool_id": pool.id,
                    "sha256": key,
                    "format": "npy",
                    "kind": ds.input_kind,
                    "shape": list(x.shape),
                    "dtype": str(x.dtype),
                    "split": split.value,
                    "meta": {"source": source, "source_split": origin},
                    "created_at": now,
                }
            )
            if not store_labels:
                answers.append(None)
            elif ds.classes is not None:
                answers.append(ds.classes[int(ds.y[index])])
            else:
                answers.append(float(ds.y[index]))

    # Blob writes are small-file syscalls that release the GIL: threads overlap them.
    with ThreadPoolExecutor(max_workers=8) as executor:
        for _ in executor.map(blobs.put, new_blobs):
            pass
    item_ids: list[int] = []
    if item_rows:
        result = session.execute(
            insert(Item).returning(col(Item.id), sort_by_parameter_order=True), item_rows
        )
        item_ids = list(result.scalars())
    label_rows = [
        {
            "pool_id": pool.id,
            "item_id": item_id,
            "value_class": answer if isinstance(answer, str) else None,
            "value_number": answer if isinstance(answer, float) else None,
            "annotator": IMPORT_ANNOTATOR,
            "round_id": None,
            "created_at": now,
        }
        for item_id, answer in zip(item_ids, answers, strict=True)
        if answer is not None
    ]
    if label_rows:
        session.execute(insert(Label), label_rows)
    session.flush()
    added = {split.value: 0 for split in Split}
    for row in item_rows:
        added[row["split"]] += 1
    return ImportResult(added=added, duplicates=duplicates, labels=len(label_rows))
